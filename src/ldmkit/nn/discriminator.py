"""Patch-GAN discriminator and the adversarial losses of the LDM autoencoder, pure torch.

NLayerDiscriminator follows pix2pix (Isola et al. 2017) as used by taming-transformers
(Esser et al. 2021, "Taming Transformers", Sec. 3.1): it scores overlapping patches, so
its logits are a (B, 1, h, w) map. The adaptive weight is Esser et al.'s Eq. (7).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldmkit.nn.blocks import group_norm


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return group_norm(channels, 32)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"NLayerDiscriminator norm must be 'batch', 'group' or 'none', got {kind!r}")


class NLayerDiscriminator(nn.Module):
    """PatchGAN: 4x4 convs, stride 2 for `n_layers` layers, LeakyReLU(0.2), one logit per patch."""

    def __init__(self, in_channels: int = 3, base_channels: int = 64, n_layers: int = 3, norm: str = "batch") -> None:
        super().__init__()
        bias = norm != "batch"  # a BatchNorm right after makes the conv bias redundant
        layers: list[nn.Module] = [nn.Conv2d(in_channels, base_channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(base_channels * prev, base_channels * mult, 4, stride=stride, padding=1, bias=bias),
                _norm(norm, base_channels * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(base_channels * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)  # (B, 1, h, w) patch logits


def _init_weights(m: nn.Module) -> None:
    # DCGAN initialisation, as in taming-transformers' `weights_init`
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def _per_sample_mean(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).mean(1)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss per sample: ½(E[relu(1 - D(x))] + E[relu(1 + D(x̂))])."""
    return 0.5 * (_per_sample_mean(F.relu(1.0 - logits_real)) + _per_sample_mean(F.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating GAN discriminator loss per sample: ½(E[softplus(-D(x))] + E[softplus(D(x̂))])."""
    return 0.5 * (_per_sample_mean(F.softplus(-logits_real)) + _per_sample_mean(F.softplus(logits_fake)))


DISC_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator loss per sample, -E[D(x̂)] (taming-transformers uses it with both D losses)."""
    return -_per_sample_mean(logits_fake)


def adaptive_gan_weight(
    nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4
) -> torch.Tensor:
    """λ = ‖∇_L nll‖ / (‖∇_L g‖ + 1e-4), clamped to [0, max_weight] and detached (Esser et al. Eq. 7).

    L is the decoder's last layer; both gradients are taken with `retain_graph=True` so the
    caller can still back-propagate the combined loss. Stays on device: no host sync.
    """
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = nll_grads.float().norm() / (g_grads.float().norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()
