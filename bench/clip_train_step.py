"""CLIP training step: ldmkit's `ClipModule` under a Lightning Trainer vs a plain open_clip loop.

Both train the same network (conf/model/clip.yaml, the quickstart CLIP, same initial weights) on the
same pre-made batches held in memory (shapes captions, images at data.resolution): the Lightning side
is `Trainer.fit` of N steps (no logger, checkpointing, progress bar or model summary;
limit_val_batches=0) over a list of batch dicts; the peer is what open_clip's own trainer
(`open_clip_train/train.py: train_one_epoch`) does per step with `open_clip.loss.ClipLoss`:
zero_grad, forward, loss, backward, gradient clipping (the config's gradient_clip_val), AdamW step,
LR schedule step, logit-scale clamp. Both use the config's AdamW settings and weight-decay groups.

The peer gets its batches the way open_clip's dataloader delivers them: captions already tokenized
and images already normalised (open_clip does both in its DataLoader workers). `ClipModule` runs
twice: on batches carrying pre-made `tokens` (like for like: the ratio that counts), and on captions
only (it tokenizes in the step, as when training from a datamodule that emits no tokens).

Per-step time: the time between the starts of consecutive steps (a callback's on_train_batch_start
in the fit, the loop head in the peer), so Trainer start-up is excluded but every per-step cost of
the loop (hooks, logging, closures, the scheduler) is included; the first steps of each fit/loop are
dropped. Fits and plain loops alternate (A, B, A, B, ...); ratio = peer step time / Lightning step
time (>= 0.95 means Lightning costs at most ~5%). Both the ratio of wall times (the target) and of CPU
times (what waiting for a busy shared CPU does not inflate) are printed.

    python bench/clip_train_step.py [--quick] [--threads 1] [--batch 128] [--steps 8] [--rounds 2]
    python bench/clip_train_step.py --profile     # torch.profiler table of one Lightning fit
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds (about 1 minute)")
    p.add_argument("--batch", type=int, default=128, help="the quickstart CLIP's batch size")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--steps", type=int, default=8, help="steps per fit / plain loop (the first 2 are not timed)")
    p.add_argument("--rounds", type=int, default=2, help="timed rounds (one fit/loop per candidate) after a warmup round")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.rounds, args.steps = 64, 2, 6
    return args


SKIP = 2  # first step periods of each fit/loop: optimizer state allocation, iterator start-up


def build(args: argparse.Namespace):
    import hydra
    import torch

    from ldmkit.nn.clip import build_clip, preprocess_images

    cfg = common.compose(["model=clip", "data=shapes", f"data.resolution={args.resolution}", f"data.batch_size={args.batch}",
                          "data.num_workers=0", "logger=none", "trainer=cpu"])
    torch.manual_seed(0)
    module = hydra.utils.instantiate(cfg.model)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("fit")
    loader = iter(datamodule.train_dataloader())
    batches = []
    for _ in range(4):  # 4 distinct batches, cycled
        batch = next(loader)
        batch["tokens"] = module.tokenizer(batch["caption"])  # (B, L), as open_clip's dataloader makes them
        batches.append(batch)
    # the peer: the same architecture and initial weights, open_clip's batch layout (images, texts)
    peer_net = build_clip(model_cfg=cfg.model.net.model_cfg, image_size=args.resolution)
    peer_net.load_state_dict(module.net.state_dict())
    peer_net.output_dict = True
    with torch.no_grad():
        peer_batches = [(preprocess_images(peer_net, b["image"]), b["tokens"]) for b in batches]
    caption_batches = [{k: v for k, v in b.items() if k != "tokens"} for b in batches]
    return cfg, module, batches, caption_batches, peer_net, peer_batches


class StepClock:
    """Lightning callback: wall/CPU time at the start of every training step."""

    def __init__(self):
        from lightning.pytorch import Callback

        outer = self

        class _Clock(Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                outer.marks.append((time.perf_counter(), common.cpu_seconds()))

            def on_train_end(self, trainer, pl_module):
                outer.marks.append((time.perf_counter(), common.cpu_seconds()))

        self.marks: list[tuple[float, float]] = []
        self.callback = _Clock()


def periods(marks: list[tuple[float, float]]) -> common.Samples:
    out = common.Samples()
    for (w0, c0), (w1, c1) in list(zip(marks, marks[1:]))[SKIP:]:
        out.wall.append(w1 - w0)
        out.cpu.append(c1 - c0)
    return out


def lightning_fit(cfg, module, batches, steps: int, profiler=None) -> common.Samples:
    from lightning.pytorch import Trainer

    clock = StepClock()
    trainer = Trainer(
        accelerator="cpu", devices=1, max_steps=steps, max_epochs=-1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[clock.callback], profiler=profiler,
    )
    trainer.fit(module, train_dataloaders=common.InMemoryBatches(batches, steps))
    return periods(clock.marks)


def plain_loop(cfg, net, batches, steps: int) -> common.Samples:
    """open_clip_train/train.py `train_one_epoch`, fp32, one process."""
    import open_clip
    import torch

    from ldmkit.lit.optim import warmup_cosine_schedule

    model_cfg = cfg.model
    optimizer = torch.optim.AdamW(
        open_clip_param_groups(net, model_cfg.optimizer.weight_decay), lr=model_cfg.optimizer.lr,
        betas=tuple(model_cfg.optimizer.betas), eps=model_cfg.optimizer.eps,
    )
    scheduler = warmup_cosine_schedule(optimizer, total_steps=steps, warmup_steps=model_cfg.scheduler.warmup_steps)
    loss_fn = open_clip.loss.ClipLoss()
    clip_norm = model_cfg.gradient_clip_val
    max_log_scale = math.log(model_cfg.max_logit_scale)
    net.train()
    marks = []
    for i in range(steps):
        marks.append((time.perf_counter(), common.cpu_seconds()))
        images, texts = batches[i % len(batches)]
        optimizer.zero_grad()
        out = net(images, texts)
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        if clip_norm:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip_norm, norm_type=2.0)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            net.logit_scale.clamp_(0, max_log_scale)
    marks.append((time.perf_counter(), common.cpu_seconds()))
    return periods(marks)


def open_clip_param_groups(net, weight_decay: float):
    """open_clip_train/main.py: no weight decay for gains, biases, logit scale (ndim < 2)."""
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": weight_decay},
    ]


def check_same_loss(module, batch, net, peer_batch) -> float:
    """Both sides compute the same loss on the same batch from the same weights."""
    import open_clip
    import torch

    with torch.no_grad():
        image_features, text_features = module.encode(batch)
        ours = module.loss(image_features, text_features, module.net.logit_scale.exp()).mean()
        out = net(*peer_batch)
        theirs = open_clip.loss.ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"])
    return abs(float(ours) - float(theirs))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    common.set_threads(args.threads)
    common.header("CLIP training step: Lightning ClipModule vs plain open_clip loop")
    cfg, module, batches, caption_batches, net, peer_batches = build(args)
    diff = check_same_loss(module, batches[0], net, peer_batches[0])
    n_params = sum(p.numel() for p in net.parameters())
    print(f"model: conf/model/clip.yaml ({n_params / 1e6:.1f}M parameters), batch {args.batch} x {args.resolution}px, "
          f"fp32, {args.steps} steps per fit/loop ({args.steps - SKIP} timed periods), {args.rounds} rounds; "
          f"|loss difference| at the same weights = {diff:.2e}")
    print(flush=True)

    if args.profile:  # Lightning's per-hook times, then the host-side Python cost of a fit by function
        import cProfile
        import pstats

        from lightning.pytorch.profilers import SimpleProfiler

        lightning_fit(cfg, module, caption_batches, args.steps)
        lightning_fit(cfg, module, caption_batches, args.steps, profiler=SimpleProfiler())
        profiler = cProfile.Profile()
        profiler.runcall(lightning_fit, cfg, module, caption_batches, args.steps)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
        return

    results = common.interleave(
        {"lightning": lambda: lightning_fit(cfg, module, batches, args.steps),
         "plain": lambda: plain_loop(cfg, net, peer_batches, args.steps),
         "lightning, captions": lambda: lightning_fit(cfg, module, caption_batches, args.steps)},
        repeats=args.rounds, warmup=1,
    )
    plain = results["plain"]
    labels = {"lightning": "ldmkit ClipModule + Trainer, pre-made tokens", "plain": "plain open_clip loop (peer)",
              "lightning, captions": "ldmkit ClipModule + Trainer, tokenizing in the step"}
    rows = [[labels[name], s.median * 1e3, s.spread(), s.median_cpu * 1e3, args.batch / s.median,
             plain.median / s.median, plain.median_cpu / s.median_cpu, len(s.wall)] for name, s in results.items()]
    common.print_table(["implementation", "step ms (median)", "IQR", "CPU ms/step", "samples/s", "ratio (wall)",
                        "ratio (CPU)", "steps timed"], rows)
    light = results["lightning"]
    print(f"Lightning overhead ratio, plain / Lightning step time (like for like, pre-made tokens): "
          f"wall {common.verdict(plain.median / light.median, 0.95)}, CPU time {plain.median_cpu / light.median_cpu:.3f}")
    print(f"at end: {common.load_average()}")


if __name__ == "__main__":
    main()
