"""UNet training step (forward + backward + AdamW) of ldmkit's UNet vs diffusers' UNet2DConditionModel.

Both nets get the same architecture (`diffusers_unet_kwargs`) and the same weights
(`state_dict_from_diffusers`), the same inputs, loss and optimizer, and run in the same process,
alternating step by step so that load from other processes on a shared machine hits both alike.
Prints samples/s (from the median wall time per step; also the median CPU time per step, which
waiting for a busy shared CPU does not inflate), peak step memory, FLOP/s and model-FLOP
utilisation, and ratios ldmkit/diffusers.

    python bench/unet_train_step.py --threads 1              # CPU: tiny preset, 16 x 8x8x4 latents
    python bench/unet_train_step.py --device cuda --preset sd15 --latent-size 64 --batch 8 --dtypes bf16 --compile

The step, the timing (interleaved, bench/common.py `interleave`) and the peak step memory (the growth
of memory during one training step over the memory held before it: weights, optimizer state, inputs;
CPU: in a fresh child process, see bench/common.py) are shared with bench/transformer_train_step.py.
Also printed: the bytes autograd saves for backward (distinct storages, `saved_tensors_hooks`),
exact and independent of the allocator.
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
from train_step_pair import Impl, train_step  # noqa: E402

from ldmkit.nn.unet import UNET_PRESETS, UNet, diffusers_unet_kwargs, state_dict_from_diffusers  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", choices=sorted(UNET_PRESETS))
    p.add_argument("--pooled-dim", type=int, default=None, help="also condition on a pooled text embedding")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--profile", action="store_true", help="print torch.profiler op tables for both nets and exit")
    pair.add_train_step_args(p)
    return p.parse_args(argv)


def build(args: argparse.Namespace) -> tuple[list[Impl], dict[str, torch.Tensor]]:
    from diffusers import UNet2DConditionModel

    config = replace(UNET_PRESETS[args.preset], pooled_dim=args.pooled_dim,
                     gradient_checkpointing=args.gradient_checkpointing)
    torch.manual_seed(0)
    theirs = UNet2DConditionModel(**diffusers_unet_kwargs(config))
    ours = UNet(config)
    ours.load_state_dict(state_dict_from_diffusers(theirs.state_dict()))  # same weights, same computation
    if args.gradient_checkpointing:
        theirs.enable_gradient_checkpointing()
    batch = pair.step_batch(config, args, lambda gen, b: torch.randint(0, 1000, (b,), generator=gen))
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    batch["x"] = batch["x"].contiguous(memory_format=memory_format)
    impls = pair.make_impls([
        ("ldmkit", ours, lambda m, x, t, c, p: m(x, t, c, p)),
        ("diffusers", theirs, lambda m, x, t, c, p: m(x, t, c, class_labels=p, return_dict=False)[0]),
    ], args, memory_format)
    return impls, batch


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


def profile(impls: list[Impl], batch: dict[str, torch.Tensor], dtype: str) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if batch["x"].is_cuda else [])
    for impl in impls:
        for _ in range(2):
            train_step(impl, batch, dtype)
        with torch_profile(activities=activities) as prof:
            for _ in range(3):
                train_step(impl, batch, dtype)
            pair.sync(batch["x"].device)
        print(f"\n=== {impl.name} ({dtype}), 3 steps ===")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    common.set_threads(args.threads)
    impls, batch = build(args)
    if args.memory_child:
        common.child_result({f"{dtype}/{impl.name}": pair.step_memory_mib(impl, batch, dtype, args.device)
                             for dtype in args.dtypes for impl in impls})
        return
    common.header("UNet training step: ldmkit vs diffusers", args, args.device)
    cfg = impls[0].model.config
    print(f"preset {args.preset}: widths {cfg.widths}, {cfg.num_res_blocks} res blocks/level, attention levels "
          f"{cfg.attention_levels}, context {args.context_len}x{cfg.context_dim}; latents "
          f"{args.batch}x{cfg.in_channels}x{args.latent_size}x{args.latent_size}")
    print(f"channels_last={args.channels_last}, compile={args.compile}, gradient_checkpointing={args.gradient_checkpointing}")
    pair.same_model_report(impls, batch, rel_tolerance=0.02)
    if args.profile:
        for dtype in args.dtypes:
            profile(impls, batch, dtype)
        return

    rows = [row for dtype in args.dtypes for row in pair.time_pair(impls, batch, dtype, args)]
    memory = common.run_child(__file__, [*argv, "--memory-child"]) if args.device == "cpu" else {}
    for row in rows:
        impl = next(impl for impl in impls if impl.name == row["impl"])
        key = f"{row['dtype']}/{impl.name}"
        row["mem"] = memory[key] if key in memory else pair.step_memory_mib(impl, batch, row["dtype"], args.device)
        row["saved"] = saved_for_backward_mib(impl, batch, row["dtype"])
    print()
    common.print_table(["dtype", "impl", "ms/step", "spread", "CPU ms", "samples/s", "GFLOP/sample", "TFLOP/s",
                        "of matmul peak", "peak MiB", "saved MiB"],
                       [[r["dtype"], r["impl"], r["ms"], r["spread"], r["cpu_ms"], r["samples_s"], r["gflop"],
                         r["tflops"], f"{r['mfu']:.1%}", r["mem"], r["saved"]] for r in rows])
    print("ratios ldmkit / diffusers (speed: > 1 is faster; memory: < 1 is smaller)")
    for dtype in args.dtypes:
        a, b = (r for r in rows if r["dtype"] == dtype)
        print(f"{dtype:5} samples/s {common.ratio(a['samples_s'], b['samples_s']):.3f}"
              f" (paired by round {common.paired_ratio(b['samples'], a['samples']):.3f},"
              f" by CPU time {common.ratio(b['cpu_ms'], a['cpu_ms']):.3f})"
              f"   peak memory {common.ratio(a['mem'], b['mem']):.3f}   saved for backward {common.ratio(a['saved'], b['saved']):.3f}")
    print(f"at end: {common.load_average()}")


if __name__ == "__main__":
    main()
