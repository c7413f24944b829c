"""bf16 attention on the CPU: ldmkit's `attention` (bf16 matmuls around a float32 softmax, `_BF16CpuAttention`)
against torch's SDPA (the CPU flash kernel) by sequence length, forward + backward: the measurements behind
`ldmkit.nn.attention.BF16_CPU_ATTENTION_MAX_SCORES`, the size up to which `attention` takes the bf16 path (the
table says which sizes it takes; the bf16 path is timed at every size).

For each (queries N, keys L): q from views of a fused (B, N, 3C) or (B, N, C) projection and k/v from a (B, L, 2C)
one, as the backbones build them; both candidates run on the same bf16 numbers, interleaved round by round
(`common.interleave`); the paired ratio is SDPA's seconds / ours per round, median. Before timing, the error of
each (output and the three input gradients, relative RMS) against float64 attention on the same bf16 inputs.
The (N, L) pairs: DiT-S cross- and self-attention at 32x32 latents (256 x 77, 256 x 256), MMDiT-small's joint
attention (333 x 333), the quickstart's 8x8 latents (64 x 77, 64 x 64), longer sequences (512, 1024).

    python bench/bf16_cpu_attention.py [--batch 8] [--heads 6] [--head-dim 64] [--rounds 12] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from ldmkit.nn.attention import BF16_CPU_ATTENTION_MAX_SCORES, _BF16CpuAttention, split_heads  # noqa: E402

SIZES = [(64, 77), (64, 64), (256, 77), (256, 256), (333, 333), (512, 512), (1024, 1024)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--rounds", type=int, default=12, help="timed rounds (after 2 warm-up rounds)")
    p.add_argument("--sizes", nargs="+", default=[f"{n}x{l}" for n, l in SIZES], help="NxL pairs")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def inputs(args: argparse.Namespace, n: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """bf16 projections (q from (B, N, C), k/v from (B, L, 2C)) and an output gradient, seeded."""
    gen = torch.Generator().manual_seed(seed)
    c = args.heads * args.head_dim
    draw = lambda *shape: torch.randn(*shape, generator=gen).to(torch.bfloat16)  # noqa: E731
    return {"q": draw(args.batch, n, c), "kv": draw(args.batch, length, 2 * c),
            "grad": draw(args.batch, args.heads, n, args.head_dim)}


def step(kind: str, x: dict[str, torch.Tensor], heads: int) -> list[torch.Tensor]:
    """Forward + backward of one candidate on fresh leaves; -> [output, grad q-projection, grad kv-projection]."""
    q_proj, kv_proj = x["q"].clone().requires_grad_(), x["kv"].clone().requires_grad_()
    (q,), (k, v) = split_heads(q_proj, 1, heads), split_heads(kv_proj, 2, heads)
    out = _BF16CpuAttention.apply(q, k, v, None) if kind == "ldmkit" else F.scaled_dot_product_attention(q, k, v)
    out.backward(x["grad"])
    return [out.detach(), q_proj.grad, kv_proj.grad]


def reference(x: dict[str, torch.Tensor], heads: int) -> list[torch.Tensor]:
    """Float64 attention on the same (bf16-valued) numbers, and its gradients."""
    q_proj, kv_proj = x["q"].double().requires_grad_(), x["kv"].double().requires_grad_()
    (q,), (k, v) = split_heads(q_proj, 1, heads), split_heads(kv_proj, 2, heads)
    out = F.scaled_dot_product_attention(q, k, v)
    out.backward(x["grad"].double())
    return [out.detach(), q_proj.grad, kv_proj.grad]


def relative_errors(got: list[torch.Tensor], ref: list[torch.Tensor]) -> list[float]:
    return [((g.double() - r).norm() / r.norm()).item() for g, r in zip(got, ref, strict=True)]


def main(argv: list[str] | None = None) -> list[list]:
    args = parse_args(argv)
    common.set_threads(args.threads)
    common.header("bf16 attention on the CPU: ldmkit's bf16 path vs SDPA (flash), forward + backward", args)
    print(f"BF16_CPU_ATTENTION_MAX_SCORES = {BF16_CPU_ATTENTION_MAX_SCORES} (attention takes ldmkit's path at "
          "N x L <= this)")
    rows = []
    for size in args.sizes:
        n, length = (int(s) for s in size.split("x"))
        x = inputs(args, n, length)
        ref = reference(x, args.heads)
        err = {kind: max(relative_errors(step(kind, x, args.heads), ref)) for kind in ("ldmkit", "sdpa")}
        timed = common.interleave({kind: (lambda kind=kind: step(kind, x, args.heads)) for kind in ("ldmkit", "sdpa")},
                                  repeats=args.rounds, warmup=2)
        paired = common.paired_ratio(timed["sdpa"], timed["ldmkit"])
        rows.append([f"{n} x {length}", n * length <= BF16_CPU_ATTENTION_MAX_SCORES, 1e3 * timed["ldmkit"].median,
                     1e3 * timed["sdpa"].median, paired, f"{err['ldmkit']:.2e}", f"{err['sdpa']:.2e}"])
        print(f"  {size}: done", flush=True)
    common.print_table(["N x L", "attention() takes it", "ldmkit ms", "SDPA ms", "speed ratio (paired)",
                        "ldmkit max rel err", "SDPA max rel err"], rows)
    print("speed ratio: SDPA's seconds / ldmkit's per round, median (> 1: ldmkit faster); errors: the largest of "
          "output / dq / dk / dv relative RMS error against float64 on the same bf16 inputs")
    print(f"at end: {common.load_average()}")
    return rows


if __name__ == "__main__":
    main()
