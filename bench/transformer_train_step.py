"""Transformer training step (forward + loss + backward + AdamW): ldmkit's DiT / MMDiT vs diffusers'
PixArtTransformer2DModel / SD3Transformer2DModel of the same architecture and weights.

Each pair gets one config (`diffusers_pixart_kwargs` / `diffusers_sd3_kwargs`), the same weights
(`state_dict_from_diffusers`), inputs, loss and optimizer, and runs in this process, interleaved step
by step (bench/common.py `interleave`) so that load from other processes hits both alike. Prints
samples/s (median wall time per step), CPU ms per step (not inflated by waiting for a busy CPU),
peak step memory (a fresh child process per run, see bench/common.py), forward+backward FLOPs per
sample, TFLOP/s and utilisation of the measured matmul peak, and ratios ldmkit/diffusers.

    python bench/transformer_train_step.py --threads 1                    # CPU: both tiny presets, 8x8x4 latents
    python bench/transformer_train_step.py --arch dit --preset S --latent-size 32 --batch 8
    python bench/transformer_train_step.py --device cuda --arch mmdit --preset sd3_medium --latent-size 64 \\
        --batch 8 --dtypes bf16 --compile
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from ldmkit.nn.backbones import dit, mmdit  # noqa: E402

ARCHS = {"dit": (dit.DIT_PRESETS, "PixArtTransformer2DModel"), "mmdit": (mmdit.MMDIT_PRESETS, "SD3Transformer2DModel")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", nargs="+", default=["dit", "mmdit"], choices=sorted(ARCHS))
    p.add_argument("--preset", default="tiny", help="preset name of each arch (DIT_PRESETS / MMDIT_PRESETS)")
    p.add_argument("--latent-size", type=int, default=8, help="latent H = W")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context-len", type=int, default=77)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                   help="fp32, or bf16 autocast (fp32 weights and optimizer)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="timed steps per implementation and dtype")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (1 avoids OpenMP spin-waits on a busy CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile both nets (slow to compile on CPU)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


@dataclass
class Impl:
    name: str
    model: torch.nn.Module
    net: Callable[..., torch.Tensor]  # the model, or torch.compile(model)
    call: Callable[..., torch.Tensor]  # (net, x, t, context, pooled) -> prediction
    optimizer: torch.optim.Optimizer


def build(arch: str, args: argparse.Namespace) -> tuple[list[Impl], dict[str, torch.Tensor | None]]:
    import diffusers

    presets, peer_name = ARCHS[arch]
    if args.preset not in presets:
        raise SystemExit(f"--preset {args.preset!r} is not a {arch} preset; choose one of {sorted(presets)}")
    config = replace(presets[args.preset], gradient_checkpointing=args.gradient_checkpointing)
    module = dit if arch == "dit" else mmdit
    kwargs = dit.diffusers_pixart_kwargs(config) if arch == "dit" else mmdit.diffusers_sd3_kwargs(config)
    torch.manual_seed(0)
    theirs = getattr(diffusers, peer_name)(**kwargs)
    ours = (dit.DiT if arch == "dit" else mmdit.MMDiT)(config)
    ours.load_state_dict(module.state_dict_from_diffusers(theirs.state_dict(), config))  # same weights
    if args.gradient_checkpointing:
        theirs.enable_gradient_checkpointing()

    gen = torch.Generator().manual_seed(0)
    b, size = args.batch, args.latent_size
    batch = {
        "x": torch.randn(b, config.in_channels, size, size, generator=gen),
        "t": torch.rand(b, generator=gen) * 1000,
        "context": torch.randn(b, args.context_len, config.context_dim, generator=gen),
        "pooled": None if config.pooled_dim is None else torch.randn(b, config.pooled_dim, generator=gen),
        "target": torch.randn(b, config.out_channels, size, size, generator=gen),
    }
    batch = {k: None if v is None else v.to(args.device) for k, v in batch.items()}
    if arch == "dit":
        peer_call = lambda m, x, t, c, p: m(x, c, t, return_dict=False)[0]  # noqa: E731
    else:
        peer_call = lambda m, x, t, c, p: m(x, c, p, t, return_dict=False)[0]  # noqa: E731
    impls = []
    for name, model, call in [("ldmkit", ours, lambda m, x, t, c, p: m(x, t, c, p)), ("diffusers", theirs, peer_call)]:
        model.to(args.device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=True)
        impls.append(Impl(name, model, torch.compile(model) if args.compile else model, call, optimizer))
    return impls, batch


def predict(impl: Impl, batch: dict, eager: bool = False) -> torch.Tensor:
    return impl.call(impl.model if eager else impl.net, batch["x"], batch["t"], batch["context"], batch["pooled"])


def train_step(impl: Impl, batch: dict, dtype: str, eager: bool = False) -> torch.Tensor:
    with torch.autocast(batch["x"].device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
        pred = predict(impl, batch, eager)
    loss = F.mse_loss(pred.float(), batch["target"])
    impl.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    impl.optimizer.step()
    return loss.detach()


def step_flops(impl: Impl, batch: dict, dtype: str) -> int:
    """Forward + backward FLOPs of matmuls, convolutions and attention, counted on the eager model."""
    counter = FlopCounterMode(display=False)
    with counter:
        train_step(impl, batch, dtype, eager=True)
    return counter.get_total_flops()


def matmul_peak_flops(device: torch.device, dtype: str) -> float:
    """Measured dense-matmul throughput, the denominator of the utilisation (no datasheet numbers)."""
    n = 8192 if device.type == "cuda" else 1024
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=torch_dtype) for _ in range(2))
    times = []
    for _ in range(8):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times[2:])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_child(args: argparse.Namespace) -> None:
    """Peak step memory of each (arch, dtype, impl) in this fresh process (see bench/common.py)."""
    out = {}
    for arch in args.arch:
        impls, batch = build(arch, args)
        for dtype in args.dtypes:
            for impl in impls:
                train_step(impl, batch, dtype)  # allocates the AdamW state
                impl.optimizer.zero_grad(set_to_none=True)  # gradients count as step memory
                with common.peak_memory(args.device) as mem:
                    train_step(impl, batch, dtype)
                out[f"{arch}/{dtype}/{impl.name}"] = mem["peak_mib"]
    common.child_result(out)


def bench_arch(arch: str, args: argparse.Namespace, memory: dict[str, float]) -> list[list]:
    impls, batch = build(arch, args)
    device = torch.device(args.device)
    counts = [sum(p.numel() for p in impl.model.parameters()) for impl in impls]
    cfg = impls[0].model.config
    print(f"{arch} preset {args.preset}: width {cfg.width}, depth {cfg.depth}, {cfg.num_heads} heads, patch "
          f"{cfg.patch_size}; latents {args.batch}x{cfg.in_channels}x{args.latent_size}x{args.latent_size}, "
          f"context {args.context_len}x{cfg.context_dim}")
    print(f"parameters: ldmkit {counts[0]:,}  diffusers {counts[1]:,}")
    if counts[0] != counts[1]:
        raise SystemExit("parameter counts differ: not the same architecture")
    with torch.no_grad():
        outs = [predict(impl, batch, eager=True) for impl in impls]
    print(f"same weights, same output: max |ldmkit - diffusers| = {(outs[0] - outs[1]).abs().max().item():.2e}")
    rows = []
    for dtype in args.dtypes:
        samples = common.interleave(
            {impl.name: (lambda impl=impl: train_step(impl, batch, dtype)) for impl in impls},
            repeats=args.steps, warmup=args.warmup, sync=lambda: sync(device),
        )
        peak = matmul_peak_flops(device, dtype)
        for impl in impls:
            s = samples[impl.name]
            flops = step_flops(impl, batch, dtype)
            rows.append([arch, dtype, impl.name, 1e3 * s.median, s.spread(), 1e3 * s.median_cpu, args.batch / s.median,
                         flops / args.batch / 1e9, flops / s.median / 1e12, f"{flops / s.median / peak:.1%}",
                         memory.get(f"{arch}/{dtype}/{impl.name}", float("nan"))])
    return rows


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    common.set_threads(args.threads)
    if args.memory_child:
        memory_child(args)
        return
    common.header("transformer training step: ldmkit vs diffusers", args, args.device)
    print(f"compile={args.compile}, gradient_checkpointing={args.gradient_checkpointing}")
    if args.device == "cpu":
        memory = common.run_child(__file__, [*argv, "--memory-child"])
    else:
        memory = {}  # CUDA: measured in this process after the timings
    rows = [row for arch in args.arch for row in bench_arch(arch, args, memory)]
    if args.device != "cpu":
        memory_rows_in_process(args, rows)
    print()
    common.print_table(["arch", "dtype", "impl", "ms/step", "spread", "CPU ms", "samples/s", "GFLOP/sample",
                        "TFLOP/s", "of matmul peak", "peak MiB"], rows)
    print("ratios ldmkit / diffusers (speed: > 1 is faster; memory: < 1 is smaller)")
    for arch in args.arch:
        for dtype in args.dtypes:
            ours, theirs = (r for r in rows if r[0] == arch and r[1] == dtype)
            print(f"{arch:5} {dtype:4}  samples/s {common.ratio(ours[6], theirs[6]):.3f}"
                  f"  (by CPU time {common.ratio(theirs[5], ours[5]):.3f})"
                  f"  peak memory {common.ratio(ours[10], theirs[10]):.3f}")
    print(f"at end: {common.load_average()}")


def memory_rows_in_process(args: argparse.Namespace, rows: list[list]) -> None:
    for arch in args.arch:
        impls, batch = build(arch, args)
        for dtype in args.dtypes:
            for impl in impls:
                train_step(impl, batch, dtype)
                impl.optimizer.zero_grad(set_to_none=True)
                with common.peak_memory(args.device) as mem:
                    train_step(impl, batch, dtype)
                next(r for r in rows if r[:3] == [arch, dtype, impl.name])[10] = mem["peak_mib"]


if __name__ == "__main__":
    main()
