"""One backbone's training step, eager and `torch.compile`d, against diffusers' model of the same
architecture and weights: the speed part of `bench/gpu_check.py` (prints one BENCH_RESULT JSON line).

Reuses the pairs built by bench/unet_train_step.py (UNet vs UNet2DConditionModel) and
bench/transformer_train_step.py (DiT vs PixArtTransformer2DModel, MMDiT vs SD3Transformer2DModel):
same config, same weights, same inputs, loss and fused AdamW. Per mode (eager, compile) it reports
samples/s (median step, interleaved with the peer), peak step memory, forward+backward FLOPs per
sample (FlopCounterMode on the eager model), and MFU against a dense matmul peak measured in this
process (bf16 for bf16 autocast). In compile mode only ldmkit's net is compiled unless
--peer-compile: the ratio is then "ldmkit compiled / diffusers eager" (stated in the result).

    python bench/gpu_check_speed.py --arch unet --preset sd15 --latent-size 64 --batch 16 --device cuda
    python bench/gpu_check_speed.py --arch dit --preset tiny --latent-size 8 --batch 2 --steps 2 \\
        --warmup 1 --compile-backend aot_eager          # CPU smoke
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import train_step_pair as pair  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", required=True, choices=["unet", "dit", "mmdit"])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--latent-size", type=int, default=8)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--context-len", type=int, default=77)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--modes", nargs="+", default=["eager", "compile"], choices=["eager", "compile"])
    p.add_argument("--compile-backend", default="inductor", help="inductor; aot_eager for a quick CPU smoke run")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    p.add_argument("--peer-compile", action="store_true", help="compile diffusers' model too")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args(argv)


def build_pair(args: argparse.Namespace):
    """([ldmkit Impl, diffusers Impl], batch) built by the arch's bench script, both nets uncompiled."""
    common_args = ["--preset", args.preset, "--latent-size", str(args.latent_size), "--batch", str(args.batch),
                   "--context-len", str(args.context_len), "--device", args.device]
    if args.arch == "unet":
        bench = common.load_bench("unet_train_step")
        impls, batch = bench.build(bench.parse_args(common_args))
    else:
        bench = common.load_bench("transformer_train_step")
        if args.arch == "dit":  # the position table laid out for the benchmarked latent size, as PixArt-512 does
            import dataclasses

            presets = bench.dit.DIT_PRESETS
            if args.preset in presets:
                presets[args.preset] = dataclasses.replace(presets[args.preset], sample_size=args.latent_size)
        impls, batch = bench.build(args.arch, bench.parse_args(common_args + ["--arch", args.arch]))
    return impls, batch


def peak_mib(impl, batch, dtype: str, device: torch.device) -> float:
    if device.type != "cuda":
        return float("nan")  # CPU: bench/*_train_step.py measure it in a fresh process; not worth a quick check
    return pair.step_memory_mib(impl, batch, dtype, str(device))


def run_mode(impls, batch, args, mode: str, peak: float, flops_per_sample: float) -> dict:
    device = batch["x"].device
    compile_s = {}
    for impl in impls:
        compiled = mode == "compile" and (impl.name == "ldmkit" or args.peer_compile)
        impl.net = torch.compile(impl.model, backend=args.compile_backend, mode=args.compile_mode) if compiled else impl.model
        if compiled:  # the first step compiles forward and backward
            pair.sync(device)
            start = time.perf_counter()
            pair.train_step(impl, batch, args.dtype)
            pair.sync(device)
            compile_s[impl.name] = time.perf_counter() - start
    samples = common.interleave({impl.name: (lambda impl=impl: pair.train_step(impl, batch, args.dtype)) for impl in impls},
                                repeats=args.steps, warmup=args.warmup, sync=lambda: pair.sync(device))
    rows = {}
    for impl in impls:
        s = samples[impl.name]
        per_s = args.batch / s.median
        rows[impl.name] = {
            "compiled": mode == "compile" and (impl.name == "ldmkit" or args.peer_compile),
            "ms_per_step": 1e3 * s.median, "spread": s.spread(), "samples_per_s": per_s,
            "tflops": flops_per_sample * per_s / 1e12, "mfu": flops_per_sample * per_s / peak,
            "peak_mib": peak_mib(impl, batch, args.dtype, device),
            "compile_s": compile_s.get(impl.name),
        }
    ours, theirs = rows["ldmkit"], rows["diffusers"]
    peer = "diffusers compiled" if args.peer_compile and mode == "compile" else "diffusers eager"
    return {"mode": mode, "impls": rows, "ratio": ours["samples_per_s"] / theirs["samples_per_s"],
            "ratio_is": f"ldmkit {'compiled' if mode == 'compile' else 'eager'} / {peer} (samples/s)"}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    common.set_threads(args.threads)
    device = torch.device(args.device)
    impls, batch = build_pair(args)
    params = [sum(p.numel() for p in impl.model.parameters()) for impl in impls]
    with torch.no_grad():
        outs = [pair.predict(impl, batch, eager=True) for impl in impls]
    max_diff = float((outs[0] - outs[1]).abs().max())
    del outs
    flops = pair.step_flops(impls[0], batch, args.dtype) / args.batch
    peak = pair.matmul_peak_flops(device, args.dtype)
    result = {
        "arch": args.arch, "preset": args.preset, "latents": [args.batch, impls[0].model.config.in_channels,
                                                              args.latent_size, args.latent_size],
        "dtype": args.dtype, "device": common.machine_summary(args.device), "params_ldmkit": params[0],
        "params_diffusers": params[1], "same_output_max_abs_diff": max_diff, "flops_per_sample": flops,
        "matmul_peak_tflops": peak / 1e12, "compile_backend": args.compile_backend, "modes": [],
    }
    for mode in args.modes:
        row = run_mode(impls, batch, args, mode, peak, flops)
        result["modes"].append(row)
        print(f"{args.arch} {mode}: ldmkit {row['impls']['ldmkit']['samples_per_s']:.2f} samples/s, "
              f"MFU {row['impls']['ldmkit']['mfu']:.1%}, ratio {row['ratio']:.3f} ({row['ratio_is']})", flush=True)
    common.child_result(result)


if __name__ == "__main__":
    main()
