"""The training step of an ldmkit network against its diffusers peer, shared by bench/unet_train_step.py,
bench/transformer_train_step.py and bench/gpu_check_speed.py: options, the pair (same weights, same inputs,
MSE loss, fused AdamW), one step, FLOPs, the measured matmul peak, step memory and the interleaved timing
(bench/common.py `interleave`, `peak_memory`)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import common


def add_train_step_args(p: argparse.ArgumentParser) -> None:
    """The options every ldmkit-vs-diffusers training-step benchmark takes."""
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


@dataclass
class Impl:
    """One side of a pair: the network, what is called (the model or torch.compile(model)), how, its AdamW."""

    name: str
    model: torch.nn.Module
    net: Callable[..., torch.Tensor]  # the model, or torch.compile(model)
    call: Callable[..., torch.Tensor]  # (net, x, t, context, pooled) -> prediction
    optimizer: torch.optim.Optimizer


def make_impls(pairs: Sequence[tuple[str, Any, Callable[..., Any]]], args: argparse.Namespace, memory_format=None) -> list[Impl]:
    """(name, model, call) -> `Impl`s in training mode on args.device, fused AdamW, compiled with --compile."""
    impls = []
    for name, model, call in pairs:
        model.to(torch.device(args.device), memory_format=memory_format or torch.contiguous_format).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=True)
        impls.append(Impl(name, model, torch.compile(model) if args.compile else model, call, optimizer))
    return impls


def step_batch(config: Any, args: argparse.Namespace, draw_t: Callable[[Any, int], Any]) -> dict[str, Any]:
    """x, t (drawn by `draw_t(generator, batch)`), context, pooled and an MSE target for a backbone config, seeded."""
    gen = torch.Generator().manual_seed(0)
    b, size = args.batch, args.latent_size
    batch = {
        "x": torch.randn(b, config.in_channels, size, size, generator=gen),
        "t": draw_t(gen, b),
        "context": torch.randn(b, args.context_len, config.context_dim, generator=gen),
        "pooled": None if config.pooled_dim is None else torch.randn(b, config.pooled_dim, generator=gen),
        "target": torch.randn(b, config.out_channels, size, size, generator=gen),
    }
    return {k: None if v is None else v.to(args.device) for k, v in batch.items()}


def predict(impl: Impl, batch: dict, eager: bool = False):
    return impl.call(impl.model if eager else impl.net, batch["x"], batch["t"], batch["context"], batch["pooled"])


def train_step(impl: Impl, batch: dict, dtype: str, eager: bool = False):
    """Forward (bf16 autocast for dtype bf16), MSE loss in fp32, backward, AdamW step."""
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


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_flops(device, dtype: str) -> float:
    """Measured dense-matmul throughput, the denominator of the utilisation (no datasheet numbers)."""
    device = torch.device(device)
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


def step_memory_mib(impl: Impl, batch: dict, dtype: str, device: str) -> float:
    """Peak memory growth of one training step (activations, gradients, temporaries) over what is held
    before it (weights, AdamW state, inputs). CPU: meaningful in a `run_child` process only."""
    train_step(impl, batch, dtype)  # allocates the AdamW state
    impl.optimizer.zero_grad(set_to_none=True)  # gradients count as step memory
    with common.peak_memory(device) as mem:
        train_step(impl, batch, dtype)
    return mem["peak_mib"]


def same_model_report(impls: Sequence[Impl], batch: dict, rel_tolerance: float = 0.0) -> None:
    """Print the parameter counts and the first forward's max |difference|; exit when the counts differ."""
    counts = [sum(p.numel() for p in impl.model.parameters()) for impl in impls]
    print(f"parameters: ldmkit {counts[0]:,}  diffusers {counts[1]:,}")
    if abs(counts[0] / counts[1] - 1) > rel_tolerance:
        raise SystemExit(f"parameter counts differ by more than {rel_tolerance:.0%}: not the same architecture")
    with torch.no_grad():
        outs = [predict(impl, batch, eager=True) for impl in impls]
    print(f"same weights, same output: max |ldmkit - diffusers| = {(outs[0] - outs[1]).abs().max().item():.2e}")


def time_pair(impls: Sequence[Impl], batch: dict, dtype: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Interleaved timed training steps of the pair (`interleave`), then per impl: ms/step, its spread,
    CPU ms, samples/s, FLOPs per sample, TFLOP/s, the fraction of the measured matmul peak and the raw `samples`."""
    device = batch["x"].device
    samples = common.interleave({impl.name: (lambda impl=impl: train_step(impl, batch, dtype)) for impl in impls},
                         repeats=args.steps, warmup=args.warmup, sync=lambda: sync(device))
    peak = matmul_peak_flops(device, dtype)
    rows = []
    for impl in impls:
        s, flops = samples[impl.name], step_flops(impl, batch, dtype)
        rows.append({"dtype": dtype, "impl": impl.name, "ms": 1e3 * s.median, "spread": s.spread(),
                     "cpu_ms": 1e3 * s.median_cpu, "samples_s": args.batch / s.median, "gflop": flops / args.batch / 1e9,
                     "tflops": flops / s.median / 1e12, "mfu": flops / s.median / peak, "samples": s})
    return rows
