"""Autoencoder training step at 256 px: samples/s and peak step memory, fp32 vs bf16 autocast.

The step is `AutoencoderModule.training_step` (L1 + KL; conf/model/autoencoder.yaml, the quickstart
size, by default) run by a Lightning Trainer, as `python train.py model=autoencoder` trains:
`trainer.precision=32-true` vs `bf16-mixed` (bf16 autocast, fp32 weights and AdamW state). Batches
are `shapes` images rendered at 256 px, pre-made in memory. Fits of N steps at each precision
alternate (A, B, A, B, ...); per-step time is the time between the starts of consecutive steps
(the last one ends at on_train_end), the first of each fit dropped.

Peak step memory: in a fresh child process per precision (see bench/common.py), the growth of
peak RSS (CPU) or of `torch.cuda.max_memory_allocated` (CUDA) during the third training step over
the memory held before it (weights, AdamW state, the batch): activations, gradients, temporaries.

    python bench/autoencoder_train_step.py [--quick] [--batch 1] [--threads 1]
    python bench/autoencoder_train_step.py --model autoencoder_f8 --device cuda --batch 8   # SD-size (LPIPS off)
    python bench/autoencoder_train_step.py --profile
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

PRECISIONS = {"fp32": "32-true", "bf16": "bf16-mixed"}
SKIP = 1  # the first step allocates the AdamW state


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--model", default="autoencoder", choices=["autoencoder", "autoencoder_f8"],
                   help="conf/model/<name>.yaml; autoencoder_f8 runs with model.lpips=null (no VGG weights offline)")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=4, help="steps per fit (the first period is not timed)")
    p.add_argument("--rounds", type=int, default=2, help="timed rounds (one fit per precision) after a warmup round")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--channels-last", action="store_true", help="model.channels_last=true")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--memory-child", choices=sorted(PRECISIONS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.steps = 1, 3
    return args


def build(args: argparse.Namespace):
    overrides = [f"model={args.model}", "data=shapes", f"data.resolution={args.resolution}", f"data.batch_size={args.batch}",
                 "data.num_workers=0", "logger=none", f"model.channels_last={str(args.channels_last).lower()}"]
    if args.model == "autoencoder_f8":
        overrides.append("model.lpips=null")
    cfg = common.compose(overrides)
    module, _, batches = common.instantiate_stage(cfg, num_batches=2)
    return cfg, module, batches


def fit(args, module, batches, precision: str, steps: int, on_step=None) -> common.Samples:
    from lightning.pytorch import Callback, Trainer

    marks: list[tuple[float, float]] = []

    class Clock(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if args.device.startswith("cuda"):
                import torch

                torch.cuda.synchronize()
            marks.append((time.perf_counter(), common.cpu_seconds()))
            if on_step:
                on_step("start", batch_idx)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if on_step:
                on_step("end", batch_idx)

        def on_train_end(self, trainer, pl_module):
            marks.append((time.perf_counter(), common.cpu_seconds()))

    trainer = Trainer(
        accelerator="gpu" if args.device.startswith("cuda") else "cpu", devices=1, precision=PRECISIONS[precision],
        max_steps=steps, max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[Clock()],
    )
    trainer.fit(module, train_dataloaders=common.InMemoryBatches(batches, steps))
    out = common.Samples()
    for (w0, c0), (w1, c1) in list(zip(marks, marks[1:]))[SKIP:]:
        out.wall.append(w1 - w0)
        out.cpu.append(c1 - c0)
    return out


def memory_child(args: argparse.Namespace) -> None:
    common.set_threads(args.threads)
    common.quiet_lightning()
    _, module, batches = build(args)
    result: dict[str, float] = {}
    region = {}

    def on_step(event: str, batch_idx: int) -> None:
        if batch_idx != 2:
            return
        if event == "start":
            region["ctx"] = common.peak_memory(args.device)
            region["out"] = region["ctx"].__enter__()
        else:
            region["ctx"].__exit__(None, None, None)
            result.update(region["out"])

    fit(args, module, batches, args.memory_child, steps=3, on_step=on_step)
    common.child_result(result)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.memory_child:
        memory_child(args)
        return
    common.set_threads(args.threads)
    common.quiet_lightning()
    import torch

    common.header(f"Autoencoder training step at {args.resolution}px: fp32 vs bf16 autocast", device=args.device)
    cfg, module, batches = build(args)
    n_params = sum(p.numel() for p in module.autoencoder.parameters())
    c = cfg.model.autoencoder.config
    print(f"model: conf/model/{args.model}.yaml (base_channels {c.base_channels}, channel_mult {list(c.channel_mult)}, "
          f"{n_params / 1e6:.2f}M parameters{', LPIPS off' if args.model == 'autoencoder_f8' else ''}), batch {args.batch} x "
          f"{args.resolution}px shapes images, {args.steps} steps per fit ({args.steps - SKIP} timed periods), "
          f"{args.rounds} rounds", flush=True)
    if args.profile:
        import torch.profiler as tp

        for precision in PRECISIONS:
            fit(args, module, batches, precision, 3)
            with tp.profile(activities=[tp.ProfilerActivity.CPU]) as prof:
                fit(args, module, batches, precision, 3)
            print(f"--- {precision}")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
        return

    sync = torch.cuda.synchronize if args.device.startswith("cuda") else None
    results = common.interleave({p: (lambda p=p: fit(args, module, batches, p, args.steps)) for p in PRECISIONS},
                                repeats=args.rounds, warmup=1, sync=sync)
    child_argv = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--quick"]
    memory = {p: common.run_child(__file__, [*child_argv, "--memory-child", p]) for p in PRECISIONS}
    fp32 = results["fp32"]
    rows = [[p, s.median * 1e3, s.spread(), s.median_cpu * 1e3, args.batch / s.median, fp32.median / s.median,
             memory[p]["peak_mib"], memory[p]["peak_mib"] / memory["fp32"]["peak_mib"]] for p, s in results.items()]
    common.print_table(["precision", "step ms (median)", "IQR", "CPU ms/step", "samples/s", "speed vs fp32",
                        "peak step MiB", "memory vs fp32"], rows)
    print(f"memory held before the step (weights, AdamW state, batch, runtime): {memory['fp32']['held_mib']:.0f} MiB")
    print(f"at end: {common.load_average()}")


if __name__ == "__main__":
    main()
