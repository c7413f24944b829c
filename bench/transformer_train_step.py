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
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import train_step_pair as pair  # noqa: E402
from train_step_pair import Impl  # noqa: E402

from ldmkit.nn.backbones import dit, mmdit  # noqa: E402

ARCHS = {"dit": (dit.DIT_PRESETS, "PixArtTransformer2DModel"), "mmdit": (mmdit.MMDIT_PRESETS, "SD3Transformer2DModel")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", nargs="+", default=["dit", "mmdit"], choices=sorted(ARCHS))
    p.add_argument("--preset", default="tiny", help="preset name of each arch (DIT_PRESETS / MMDIT_PRESETS)")
    pair.add_train_step_args(p)
    return p.parse_args(argv)


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
    batch = pair.step_batch(config, args, lambda gen, b: torch.rand(b, generator=gen) * 1000)
    if arch == "dit":
        peer_call = lambda m, x, t, c, p: m(x, c, t, return_dict=False)[0]  # noqa: E731
    else:
        peer_call = lambda m, x, t, c, p: m(x, c, p, t, return_dict=False)[0]  # noqa: E731
    impls = pair.make_impls([("ldmkit", ours, lambda m, x, t, c, p: m(x, t, c, p)), ("diffusers", theirs, peer_call)], args)
    return impls, batch


def memory_child(args: argparse.Namespace) -> None:
    """Peak step memory of each (arch, dtype, impl) in this fresh process (see bench/common.py)."""
    out = {}
    for arch in args.arch:
        impls, batch = build(arch, args)
        for dtype in args.dtypes:
            for impl in impls:
                out[f"{arch}/{dtype}/{impl.name}"] = pair.step_memory_mib(impl, batch, dtype, args.device)
    common.child_result(out)


def bench_arch(arch: str, args: argparse.Namespace, memory: dict[str, float]) -> list[list]:
    impls, batch = build(arch, args)
    cfg = impls[0].model.config
    print(f"{arch} preset {args.preset}: width {cfg.width}, depth {cfg.depth}, {cfg.num_heads} heads, patch "
          f"{cfg.patch_size}; latents {args.batch}x{cfg.in_channels}x{args.latent_size}x{args.latent_size}, "
          f"context {args.context_len}x{cfg.context_dim}")
    pair.same_model_report(impls, batch)
    rows = []
    for dtype in args.dtypes:
        timed = pair.time_pair(impls, batch, dtype, args)
        paired = common.paired_ratio(timed[1]["samples"], timed[0]["samples"])  # diffusers' seconds / ours, per round
        for r in timed:
            rows.append([arch, dtype, r["impl"], r["ms"], r["spread"], r["cpu_ms"], r["samples_s"], r["gflop"],
                         r["tflops"], f"{r['mfu']:.1%}", memory.get(f"{arch}/{dtype}/{r['impl']}", float("nan")), paired])
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
                        "TFLOP/s", "of matmul peak", "peak MiB"], [row[:11] for row in rows])
    print("ratios ldmkit / diffusers (speed: > 1 is faster; memory: < 1 is smaller)")
    for arch in args.arch:
        for dtype in args.dtypes:
            ours, theirs = (r for r in rows if r[0] == arch and r[1] == dtype)
            print(f"{arch:5} {dtype:4}  samples/s {common.ratio(ours[6], theirs[6]):.3f}"
                  f"  (paired by round {ours[11]:.3f}, by CPU time {common.ratio(theirs[5], ours[5]):.3f})"
                  f"  peak memory {common.ratio(ours[10], theirs[10]):.3f}")
    print(f"at end: {common.load_average()}")


def memory_rows_in_process(args: argparse.Namespace, rows: list[list]) -> None:
    for arch in args.arch:
        impls, batch = build(arch, args)
        for dtype in args.dtypes:
            for impl in impls:
                mib = pair.step_memory_mib(impl, batch, dtype, args.device)
                next(r for r in rows if r[:3] == [arch, dtype, impl.name])[10] = mib


if __name__ == "__main__":
    main()
