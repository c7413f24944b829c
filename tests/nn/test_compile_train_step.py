"""`torch.compile` (Inductor, CPU C++ codegen) of each backbone gives the training step eager gives:
the diffusion loss, every parameter's gradient, and the losses of the next AdamW steps.

The step is what the LDM module does with `model.compile=true`: only the network is compiled; noising
(x_t = alpha x_0 + sigma eps, the cosine VP schedule of Nichol & Dhariwal 2021 in closed form), the
v target (Salimans & Ho 2022, eq. 4 of their appendix D: v = alpha eps - sigma x_0), the MSE and AdamW
stay eager. Transformer forwards alone are compared in tests/nn/backbones (helper "transformers");
this is the whole step, and for the UNet the first Inductor (not aot_eager) check on the CPU.

Tolerances. fp32: Inductor fuses pointwise ops and reorders reductions (GroupNorm/LayerNorm statistics,
softmax, matmul-epilogue sums); each such change is a few fp32 ulps (~1e-7 relative) and a 2-level
network amplifies them to ~1e-6, so losses and gradients must agree to rtol 1e-4 (100x margin).
Gradients that are nearly zero have no relative precision, hence atol = 1e-5 x the largest gradient
of the network. Three AdamW steps: Adam's first update is lr * g/|g| elementwise, which flips for a
gradient whose sign is within rounding of zero, so parameters are not compared; the losses after the
steps are (rtol 1e-4), which such a flip of a negligible gradient cannot move. bf16 autocast: Inductor
keeps fused intermediates in fp32 where eager rounds every op's output to bf16 (8 mantissa bits,
relative step 2^-8 = 3.9e-3), so the loss may differ by a few bf16 steps: rtol 2e-2; gradients by
cosine similarity > 0.99 with norms within 5%.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

SIZE, BATCH, CONTEXT_LEN, CONTEXT_DIM, POOLED_DIM = 8, 2, 5, 16, 12


def build(arch: str) -> torch.nn.Module:
    """A two-level / two-block version of each backbone on main, zero-initialised outputs perturbed."""
    torch.manual_seed(0)
    if arch == "unet":
        from ldmkit.nn.unet import UNet, UNetConfig

        model = UNet(UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                                num_heads=2, context_dim=CONTEXT_DIM, pooled_dim=POOLED_DIM, norm_groups=8))
    else:
        module = pytest.importorskip(f"ldmkit.nn.backbones.{arch}")
        if arch == "dit":
            model = module.DiT(module.DiTConfig(sample_size=SIZE, patch_size=2, width=64, depth=2, num_heads=4,
                                                context_dim=CONTEXT_DIM, pooled_dim=POOLED_DIM))
        else:
            model = module.MMDiT(module.MMDiTConfig(in_channels=4, out_channels=4, sample_size=SIZE, patch_size=2, width=64,
                                                    depth=2, num_heads=4, context_dim=CONTEXT_DIM, pooled_dim=POOLED_DIM,
                                                    pos_embed_max_size=16))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return model


def batch(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 1000, (BATCH,), generator=gen)
    alpha_bar = torch.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # cosine schedule, closed form
    return {"x0": torch.randn(BATCH, 4, SIZE, SIZE, generator=gen), "eps": torch.randn(BATCH, 4, SIZE, SIZE, generator=gen),
            "t": t, "alpha": alpha_bar.sqrt().view(-1, 1, 1, 1), "sigma": (1 - alpha_bar).sqrt().view(-1, 1, 1, 1),
            "context": torch.randn(BATCH, CONTEXT_LEN, CONTEXT_DIM, generator=gen),
            "pooled": torch.randn(BATCH, POOLED_DIM, generator=gen)}


def train_step(net, model, optimizer, b, bf16: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x_t = b["alpha"] * b["x0"] + b["sigma"] * b["eps"]
    target = b["alpha"] * b["eps"] - b["sigma"] * b["x0"]  # v
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        pred = net(x_t, b["t"].float(), b["context"], b["pooled"])
    loss = (pred.float() - target).square().mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    optimizer.step()
    return loss.detach(), grads


def run(arch: str, compiled: bool, bf16: bool, steps: int = 3):
    model = build(arch)
    net = torch.compile(model, backend="inductor") if compiled else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, foreach=False)
    losses, first_grads = [], None
    for step in range(steps):
        loss, grads = train_step(net, model, optimizer, batch(seed=step), bf16)
        losses.append(loss)
        first_grads = first_grads or grads
    return torch.stack(losses), first_grads


@pytest.mark.slow
@pytest.mark.heavy
@pytest.mark.parametrize("arch", ["unet", "dit", "mmdit"])
def test_compiled_training_step_matches_eager_fp32(arch):
    torch._dynamo.reset()
    eager_losses, eager_grads = run(arch, compiled=False, bf16=False)
    losses, grads = run(arch, compiled=True, bf16=False)
    torch.testing.assert_close(losses, eager_losses, rtol=1e-4, atol=0)
    assert eager_losses[-1] != eager_losses[0]  # the steps did update the weights
    scale = max(g.abs().max() for g in eager_grads)
    for grad, expected in zip(grads, eager_grads):
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-5 * float(scale))


@pytest.mark.slow
@pytest.mark.heavy
@pytest.mark.parametrize("arch", ["unet", "dit", "mmdit"])
def test_compiled_training_step_matches_eager_bf16_autocast(arch):
    torch._dynamo.reset()
    eager_losses, eager_grads = run(arch, compiled=False, bf16=True, steps=1)
    losses, grads = run(arch, compiled=True, bf16=True, steps=1)
    torch.testing.assert_close(losses, eager_losses, rtol=2e-2, atol=0)
    flat, expected = torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in eager_grads])
    assert torch.nn.functional.cosine_similarity(flat, expected, dim=0) > 0.99
    assert abs(flat.norm() / expected.norm() - 1) < 0.05


def test_every_backbone_on_main_is_covered():
    """A backbone class (one with the contract's `arch` and `config_class`) in ldmkit.nn.backbones that
    the parametrisations above do not name fails here, so that it gets its compiled-training-step test."""
    from pathlib import Path

    import ldmkit.nn

    folder = Path(ldmkit.nn.__file__).parent / "backbones"
    archs = set()
    for path in folder.glob("*.py"):
        module = importlib.import_module(f"ldmkit.nn.backbones.{path.stem}")
        archs |= {cls.arch for cls in vars(module).values()
                  if isinstance(cls, type) and issubclass(cls, torch.nn.Module) and cls.__module__ == module.__name__
                  and isinstance(getattr(cls, "arch", None), str) and hasattr(cls, "config_class")}
    assert archs, "no backbone class found in ldmkit.nn.backbones"
    assert archs <= {"unet", "dit", "mmdit"}, f"backbones without a compiled-training-step test: {archs - {'unet', 'dit', 'mmdit'}}"
