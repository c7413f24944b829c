"""SDPA forward + backward by the layout of its q/k/v inputs (issue 16: where is the bf16 step gap to diffusers?).

ldmkit's attention (`ldmkit.nn.attention.split_heads`) hands SDPA views of ONE fused (B, N, 3C) projection (row stride
3C); diffusers' hands it views of three separate (B, N, C) projections (row stride C). This times the attention kernel
alone, forward and backward into the projections' gradients, for those two layouts, for contiguous (B, H, N, D) inputs
and for the fused projection split with `chunk` on the last dim, interleaved round by round (`common.interleave`). All
four compute the same attention from the same numbers (checked before timing; gathering each layout's gradients into
the (B, N, 3C) layout for that check stays out of the timed calls).

    python bench/sdpa_layout.py [--batch 8] [--tokens 256] [--heads 6] [--head-dim 64] [--dtype bf16] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
# f(fused (B, N, 3C) numbers) -> ((q, k, v) each (B, H, N, D) with fresh autograd leaves, g() -> the gradient that
# reached the leaves, as (B, N, 3C)); g is only called by the check, outside the timed calls
Layout = Callable[[torch.Tensor], tuple[QKV, Callable[[], torch.Tensor]]]


def layouts(heads: int) -> dict[str, Layout]:
    """The four q/k/v layouts, by name."""

    def fused_unbind(x):  # ldmkit: one projection, unbound on the parts axis
        leaf = x.detach().clone().requires_grad_()
        b, n, _ = leaf.shape
        return tuple(y.transpose(1, 2) for y in leaf.view(b, n, 3, heads, -1).unbind(2)), lambda: leaf.grad

    def fused_chunk(x):  # one projection, split on the last dim
        leaf = x.detach().clone().requires_grad_()
        b, n, _ = leaf.shape
        return tuple(y.view(b, n, heads, -1).transpose(1, 2) for y in leaf.chunk(3, dim=-1)), lambda: leaf.grad

    def separate(x):  # diffusers: three projections
        b, n, _ = x.shape
        parts = [p.detach().clone().requires_grad_() for p in x.view(b, n, 3, -1).unbind(2)]
        qkv = tuple(p.view(b, n, heads, -1).transpose(1, 2) for p in parts)
        return qkv, lambda: torch.stack([p.grad for p in parts], dim=2).flatten(2)

    def contiguous(x):
        b, n, _ = x.shape
        parts = [p.transpose(1, 2).contiguous().detach().requires_grad_() for p in x.view(b, n, 3, heads, -1).unbind(2)]
        return tuple(parts), lambda: torch.stack([p.grad.transpose(1, 2) for p in parts], dim=2).flatten(2)

    return {"fused_unbind (ldmkit)": fused_unbind, "separate (diffusers)": separate, "contiguous": contiguous,
            "fused_chunk": fused_chunk}


def attention_step(layout: Layout, x: torch.Tensor, grad_out: torch.Tensor) -> tuple[torch.Tensor, Callable[[], torch.Tensor]]:
    """Forward + backward of SDPA on `layout(x)` (what is timed); returns the output and the layout's gradient
    getter (the (B, N, 3C) gradient is assembled only when called)."""
    (q, k, v), gradient = layout(x)
    out = F.scaled_dot_product_attention(q, k, v)
    out.backward(grad_out)
    return out.detach(), gradient


def check_same_attention(candidates: dict[str, Layout], x: torch.Tensor, grad_out: torch.Tensor) -> None:
    """Every layout: the same output and input gradient as the first one (same numbers in), or SystemExit."""
    atol = 1e-2 if x.dtype == torch.bfloat16 else 1e-5
    (first, layout), *others = candidates.items()
    out0, grad0 = attention_step(layout, x, grad_out)
    for name, layout in others:
        out, grad = attention_step(layout, x, grad_out)
        if not (torch.allclose(out, out0, rtol=0, atol=atol) and torch.allclose(grad(), grad0(), rtol=0, atol=atol)):
            raise SystemExit(f"{name} does not compute what {first} does")


def main(argv: list[str] | None = None) -> dict[str, common.Samples]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=26)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.tokens, 3 * args.heads * args.head_dim, generator=g).to(dtype)
    grad_out = torch.randn(args.batch, args.heads, args.tokens, args.head_dim, generator=g).to(dtype)
    candidates = layouts(args.heads)
    check_same_attention(candidates, x, grad_out)
    results = common.interleave({n: (lambda f=f: attention_step(f, x, grad_out)) for n, f in candidates.items()},
                                repeats=args.repeats, warmup=2)
    base = results["fused_unbind (ldmkit)"]
    print(f"SDPA fwd+bwd, {args.dtype}, B {args.batch}, N {args.tokens}, {args.heads} heads x {args.head_dim}, "
          f"{args.threads} thread(s), {args.repeats} rounds; torch {torch.__version__}")
    for name, samples in results.items():
        print(f"{name:24s} median {samples.median * 1e3:8.2f} ms {samples.spread():>6s}   "
              f"speed of ldmkit's layout vs this one (paired; > 1: ldmkit's faster) {common.paired_ratio(samples, base):.3f}")
    return results


if __name__ == "__main__":
    main()
