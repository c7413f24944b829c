"""Shared checks of the backbones (UNet, DiT, MMDiT): tiny configs, inputs, perturbed weights, and the
properties every backbone must have whatever its architecture (tests/nn/backbones/test_contract.py)."""

from __future__ import annotations

import torch

from ldmkit.lit.optim import param_groups
from ldmkit.nn.backbones import build_backbone

# A small config of each arch that still exercises every block type.
TINY = {
    "unet": dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1), num_heads=2,
                 context_dim=16, norm_groups=8),
    "dit": dict(sample_size=8, patch_size=2, width=64, depth=2, num_heads=4, context_dim=24),
    "mmdit": dict(in_channels=4, out_channels=4, sample_size=8, patch_size=2, width=64, depth=3, num_heads=4,
                  context_dim=24, pooled_dim=12, pos_embed_max_size=16),
}


def tiny(arch: str, **overrides) -> torch.nn.Module:
    """`arch` built from `TINY[arch]` with fields replaced (its config is `model.config`)."""
    return build_backbone(arch, {**TINY[arch], **overrides})


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def randomized(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Add noise to every parameter, so the zero-initialised ones (outputs, gates) pass signal too."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model


def converted_pair(make_reference, model: torch.nn.Module, convert) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(diffusers reference built by `make_reference()` after seeding, its weights perturbed; `model` loaded
    with `convert(reference.state_dict())`), both in eval mode."""
    torch.manual_seed(0)
    reference = randomized(make_reference()).eval()
    model.load_state_dict(convert(reference.state_dict()), strict=True)
    return reference, model.eval()


def inputs(cfg, batch: int = 2, size: tuple[int, int] = (8, 8), length: int = 5, seed: int = 0):
    """x, t (float network time), context, pooled for a backbone config."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, *size, generator=gen)
    t = torch.rand(batch, generator=gen) * 1000
    context = None if cfg.context_dim is None else torch.randn(batch, length, cfg.context_dim, generator=gen)
    pooled = None if cfg.pooled_dim is None else torch.randn(batch, cfg.pooled_dim, generator=gen)
    return x, t, context, pooled


MASK = torch.tensor([[True, True, True, False, False], [True] * 5])


def check_mask_hides_tokens(model, cfg) -> None:
    """The context changes the output; changing masked context tokens changes nothing, unmasked ones do."""
    x, t, context, pooled = inputs(cfg)
    with torch.no_grad():
        assert not torch.allclose(model(x, t, torch.randn_like(context), pooled), model(x, t, context, pooled), atol=1e-4)
        out = model(x, t, context, pooled, MASK)
        changed = context.clone()
        changed[0, 3:] = torch.randn(2, cfg.context_dim)  # masked tokens of sample 0
        torch.testing.assert_close(model(x, t, changed, pooled, MASK), out, rtol=1e-5, atol=1e-6)
        changed[1, 3:] = torch.randn(2, cfg.context_dim)  # unmasked tokens of sample 1
        assert not torch.allclose(model(x, t, changed, pooled, MASK)[1], out[1], atol=1e-4)
        assert not torch.allclose(model(x, t, context, pooled)[0], out[0], atol=1e-4)  # the mask matters


def check_gradient_checkpointing(model, cfg) -> None:
    x, t, context, pooled = inputs(cfg)

    def run(checkpointing: bool):
        model.zero_grad()
        model.gradient_checkpointing = checkpointing
        out = model(x, t, context, pooled, MASK if context is not None else None)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    out_plain, grads_plain = run(False)
    out_ckpt, grads_ckpt = run(True)
    model.gradient_checkpointing = False
    torch.testing.assert_close(out_ckpt, out_plain, rtol=0, atol=0)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=0, atol=0, msg=name)


def check_bf16_autocast(model, cfg) -> None:
    x, t, context, pooled = inputs(cfg)
    expected = model(x, t, context, pooled).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, context, pooled, MASK if context is not None else None)
    out.float().square().mean().backward()
    assert out.shape == expected.shape
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        unmasked = model(x, t, context, pooled)
    assert (unmasked.float() - expected).abs().max() < 0.05 * expected.abs().max()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def check_compiled_matches_eager(model, cfg, backend: str = "inductor", tol: float = 1e-4) -> None:
    """fullgraph=True: a graph break anywhere (block loop included) fails the compile."""
    x, t, context, pooled = inputs(cfg)
    mask = MASK if context is not None else None
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    expected = model(x, t, context, pooled, mask)
    out = compiled(x, t, context, pooled, mask)
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol / 10)
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(out.square().mean(), params)
    expected_grads = torch.autograd.grad(expected.square().mean(), params)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=10 * tol, atol=tol / 10)


def check_fits_a_fixed_batch(model, cfg) -> None:
    """A few AdamW steps, with the parameter groups every stage uses (`lit.optim.param_groups`), fit a batch."""
    torch.manual_seed(0)
    opt = torch.optim.AdamW(param_groups(model), lr=1e-3, weight_decay=0.01)
    x, t, context, pooled = inputs(cfg, batch=4)
    target = torch.randn_like(x)
    losses = []
    for _ in range(8):
        loss = (model(x, t, context, pooled) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
