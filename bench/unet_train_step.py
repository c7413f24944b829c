"""UNet training step (forward + backward + AdamW) of ldmkit's UNet vs diffusers' UNet2DConditionModel.

Both nets get the same architecture (`diffusers_unet_kwargs`) and the same weights
(`state_dict_from_diffusers`), the same inputs, loss and optimizer, and run in the same process,
alternating step by step so that load from other processes on a shared machine hits both alike.
Prints samples/s (from the median wall time per step; also the median CPU time per step, which
waiting for a busy shared CPU does not inflate), peak step memory, FLOP/s and model-FLOP
utilisation, and ratios ldmkit/diffusers.

    python bench/unet_train_step.py --threads 1              # CPU: tiny preset, 16 x 8x8x4 latents
    python bench/unet_train_step.py --device cuda --preset sd15 --latent-size 64 --batch 8 --dtypes bf16 --compile

Peak memory is the growth of memory during one training step over the memory held before it
(weights, optimizer state, inputs): activations, gradients (`zero_grad(set_to_none=True)`) and
temporaries. CUDA: `torch.cuda.max_memory_allocated`. CPU (Linux): the process's peak RSS
(`VmHWM`, reset through `/proc/self/clear_refs` before the step) minus its RSS before the step;
measured in a separate process started with glibc's mmap threshold pinned at 64 KiB, so freed
tensors leave RSS at once instead of staying cached in the heap, where they would hide the next
step's allocations (pinned, every large allocation is a syscall, so the timings run without it).
Also printed: the bytes autograd saves for backward (distinct storages, `saved_tensors_hooks`),
exact and independent of the allocator.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ldmkit.nn.unet import UNET_PRESETS, UNet, diffusers_unet_kwargs, state_dict_from_diffusers


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", choices=sorted(UNET_PRESETS))
    p.add_argument("--latent-size", type=int, default=8, help="latent H = W")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context-len", type=int, default=77)
    p.add_argument("--pooled-dim", type=int, default=None, help="also condition on a pooled text embedding")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                   help="fp32, or bf16 autocast (fp32 weights and optimizer)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="timed steps per implementation and dtype")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default torch's); on an oversubscribed CPU 1 thread avoids OpenMP spin-waits")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile both nets (slow to compile on CPU)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--profile", action="store_true", help="print torch.profiler op tables for both nets and exit")
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


@dataclass
class Impl:
    name: str
    model: torch.nn.Module
    net: Callable[..., torch.Tensor]  # the model, or torch.compile(model)
    call: Callable[..., torch.Tensor]  # (net, x, t, context, pooled) -> prediction
    optimizer: torch.optim.Optimizer


def build(args: argparse.Namespace) -> tuple[list[Impl], dict[str, torch.Tensor]]:
    from diffusers import UNet2DConditionModel

    config = replace(UNET_PRESETS[args.preset], pooled_dim=args.pooled_dim,
                     gradient_checkpointing=args.gradient_checkpointing)
    device = torch.device(args.device)
    torch.manual_seed(0)
    theirs = UNet2DConditionModel(**diffusers_unet_kwargs(config))
    ours = UNet(config)
    ours.load_state_dict(state_dict_from_diffusers(theirs.state_dict()))  # same weights, same computation
    if args.gradient_checkpointing:
        theirs.enable_gradient_checkpointing()

    gen = torch.Generator().manual_seed(0)
    b, size = args.batch, args.latent_size
    batch = {
        "x": torch.randn(b, config.in_channels, size, size, generator=gen),
        "t": torch.randint(0, 1000, (b,), generator=gen),
        "context": torch.randn(b, args.context_len, config.context_dim, generator=gen),
        "pooled": None if config.pooled_dim is None else torch.randn(b, config.pooled_dim, generator=gen),
        "target": torch.randn(b, config.out_channels, size, size, generator=gen),
    }
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    batch = {k: None if v is None else v.to(device) for k, v in batch.items()}
    batch["x"] = batch["x"].contiguous(memory_format=memory_format)

    impls = []
    for name, model, call in [
        ("ldmkit", ours, lambda m, x, t, c, p: m(x, t, c, p)),
        ("diffusers", theirs, lambda m, x, t, c, p: m(x, t, c, class_labels=p, return_dict=False)[0]),
    ]:
        model.to(device, memory_format=memory_format).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=True)
        impls.append(Impl(name, model, torch.compile(model) if args.compile else model, call, optimizer))
    return impls, batch


def train_step(impl: Impl, batch: dict[str, torch.Tensor], dtype: str, eager: bool = False) -> torch.Tensor:
    with torch.autocast(batch["x"].device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
        pred = predict(impl, batch, eager)
    loss = F.mse_loss(pred.float(), batch["target"])
    impl.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    impl.optimizer.step()
    return loss.detach()


def predict(impl: Impl, batch: dict[str, torch.Tensor], eager: bool = False) -> torch.Tensor:
    return impl.call(impl.model if eager else impl.net, batch["x"], batch["t"], batch["context"], batch["pooled"])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- memory ---------------------------------------------------------------------------------------

def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def cpu_memory_in_subprocess(argv: list[str]) -> dict[str, float]:
    """Peak step memory of each (dtype, impl), measured in a fresh process whose glibc returns every
    allocation above 64 KiB to the OS on free (so RSS follows live tensors). Not in this process:
    there the pinned threshold would slow the timed steps, and set late it would miss heap reuse."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024), "MALLOC_TRIM_THRESHOLD_": str(128 * 1024)}
    child = subprocess.run([sys.executable, __file__, *argv, "--memory-child"], env=env, capture_output=True,
                           text=True, check=True)
    return json.loads(child.stdout.strip().splitlines()[-1])


def peak_step_memory_mib(impl: Impl, batch: dict[str, torch.Tensor], dtype: str) -> float:
    device = batch["x"].device
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        train_step(impl, batch, dtype)
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    impl.optimizer.zero_grad(set_to_none=True)  # grads count as step memory, as on CUDA
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _proc_status_kib("VmRSS")
    train_step(impl, batch, dtype)
    return (_proc_status_kib("VmHWM") - before) / 1024


def saved_for_backward_mib(impl: Impl, batch: dict[str, torch.Tensor], dtype: str) -> float:
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        train_step(impl, batch, dtype)
    params = {p.untyped_storage().data_ptr() for p in impl.model.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in params) / 2**20


# ---- FLOPs ----------------------------------------------------------------------------------------

def step_flops(impl: Impl, batch: dict[str, torch.Tensor], dtype: str) -> int:
    """Forward + backward FLOPs of matmuls, convolutions and attention, counted on the eager model."""
    counter = FlopCounterMode(display=False)
    with counter:
        train_step(impl, batch, dtype, eager=True)
    return counter.get_total_flops()


def matmul_peak_flops(device: torch.device, dtype: str) -> float:
    """Measured dense-matmul throughput, the denominator of MFU (no datasheet numbers)."""
    n = 8192 if device.type == "cuda" else 1024
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    a = torch.randn(n, n, device=device, dtype=torch_dtype)
    b = torch.randn(n, n, device=device, dtype=torch_dtype)
    times = []
    for _ in range(8):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times[2:])


# ---- main -----------------------------------------------------------------------------------------

def profile(impls: list[Impl], batch: dict[str, torch.Tensor], dtype: str) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if batch["x"].is_cuda else [])
    for impl in impls:
        for _ in range(2):
            train_step(impl, batch, dtype)
        with torch_profile(activities=activities) as prof:
            for _ in range(3):
                train_step(impl, batch, dtype)
            synchronize(batch["x"].device)
        print(f"\n=== {impl.name} ({dtype}), 3 steps ===")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    impls, batch = build(args)
    ours, theirs = impls
    if args.memory_child:
        memory = {}
        for dtype in args.dtypes:
            for impl in impls:
                train_step(impl, batch, dtype)  # allocates the AdamW state
                memory[f"{dtype}/{impl.name}"] = peak_step_memory_mib(impl, batch, dtype)
        print(json.dumps(memory))
        return
    counts = [sum(p.numel() for p in impl.model.parameters()) for impl in impls]
    cfg = ours.model.config
    print(f"preset {args.preset}: widths {cfg.widths}, {cfg.num_res_blocks} res blocks/level, attention levels "
          f"{cfg.attention_levels}, context {args.context_len}x{cfg.context_dim}; latents "
          f"{args.batch}x{cfg.in_channels}x{args.latent_size}x{args.latent_size}")
    print(f"device {device} ({torch.get_num_threads()} threads), torch {torch.__version__}, "
          f"channels_last={args.channels_last}, compile={args.compile}, "
          f"gradient_checkpointing={args.gradient_checkpointing}")
    print(f"parameters: ldmkit {counts[0]:,}  diffusers {counts[1]:,}  ratio {counts[0] / counts[1]:.4f}")
    if abs(counts[0] / counts[1] - 1) > 0.02:
        raise SystemExit("parameter counts differ by more than 2%: not the same architecture")
    with torch.no_grad():
        outs = [predict(impl, batch, eager=True) for impl in impls]
    print(f"same weights, same output: max |ldmkit - diffusers| = {(outs[0] - outs[1]).abs().max().item():.2e}")
    del outs

    if args.profile:
        for dtype in args.dtypes:
            profile(impls, batch, dtype)
        return

    rows = [row for dtype in args.dtypes for row in measure_speed(impls, batch, dtype, args)]
    memory = cpu_memory_in_subprocess(argv) if device.type == "cpu" else {}
    for row in rows:
        impl = next(impl for impl in impls if impl.name == row["impl"])
        key = f"{row['dtype']}/{impl.name}"
        row["mem"] = memory[key] if key in memory else peak_step_memory_mib(impl, batch, row["dtype"])
        row["saved"] = saved_for_backward_mib(impl, batch, row["dtype"])
    print(f"\n{'dtype':5} {'impl':9} {'ms/step':>8} {'IQR ms':>7} {'CPU ms':>7} {'samples/s':>9} {'TFLOP/s':>8} "
          f"{'MFU':>6} {'peak MiB':>8} {'saved MiB':>9}")
    for r in rows:
        print(f"{r['dtype']:5} {r['impl']:9} {r['ms']:8.1f} {r['iqr']:7.1f} {r['cpu_ms']:7.1f} {r['samples_s']:9.2f} "
              f"{r['tflops']:8.4f} {r['mfu']:6.1%} {r['mem']:8.1f} {r['saved']:9.1f}")
    print("\nratios ldmkit / diffusers (speed: >1 is faster; memory: <1 is smaller)")
    for dtype in args.dtypes:
        a, b = (r for r in rows if r["dtype"] == dtype)
        print(f"{dtype:5} samples/s {a['samples_s'] / b['samples_s']:.3f} (by CPU time {b['cpu_ms'] / a['cpu_ms']:.3f})"
              f"   peak memory {a['mem'] / b['mem']:.3f}   saved for backward {a['saved'] / b['saved']:.3f}")


def measure_speed(
    impls: list[Impl], batch: dict[str, torch.Tensor], dtype: str, args: argparse.Namespace
) -> list[dict[str, float | str]]:
    device = batch["x"].device
    wall: dict[str, list[float]] = {impl.name: [] for impl in impls}
    cpu: dict[str, list[float]] = {impl.name: [] for impl in impls}
    for impl in impls:
        for _ in range(args.warmup):
            train_step(impl, batch, dtype)
    for i in range(args.steps):  # alternate, swapping who goes first, so load drifts hit both alike
        for impl in impls if i % 2 == 0 else impls[::-1]:
            synchronize(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            train_step(impl, batch, dtype)
            synchronize(device)
            wall[impl.name].append(time.perf_counter() - start)
            cpu[impl.name].append(time.process_time() - start_cpu)
    peak = matmul_peak_flops(device, dtype)
    rows = []
    for impl in impls:
        seconds = statistics.median(wall[impl.name])
        q1, _, q3 = statistics.quantiles(wall[impl.name], n=4)
        flops = step_flops(impl, batch, dtype)
        rows.append({
            "dtype": dtype, "impl": impl.name, "ms": 1e3 * seconds, "iqr": 1e3 * (q3 - q1),
            "cpu_ms": 1e3 * statistics.median(cpu[impl.name]), "samples_s": args.batch / seconds,
            "tflops": flops / seconds / 1e12, "mfu": flops / seconds / peak,
        })
    print(f"{dtype}: measured matmul peak {peak / 1e12:.3f} TFLOP/s; FLOPs per step {flops / 1e9:.1f} G")
    return rows

if __name__ == "__main__":
    main()
