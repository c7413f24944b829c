"""Data pipeline: webdataset shard decode + augment throughput, and how long training waits on data.

1. Shards: `shapes` exported as img2dataset-style shards (`python -m ldmkit.data.export_shards`, PNG at
   --export-resolution; cached between runs under --cache), read back by `data=laion_subset` (`WebDatasetDataModule`: resampled shards,
   shuffle buffer, PNG decode, centre crop + bicubic resize to data.resolution, random hflip, json
   attributes, collate) on 2 DataLoader workers. Peer: the textbook webdataset pipeline on the same
   shards and DataLoader settings: `wds.WebDataset(resampled).shuffle().decode("pil")` + torchvision
   `Resize/CenterCrop/RandomHorizontalFlip/ToTensor/Normalize`. Images/s from the arrival of the
   first batch of an epoch to its last (worker start-up excluded), epochs of the two alternating.
2. Waiting on data: a Lightning fit of a quickstart model (conf/model/autoencoder.yaml on
   `data=shapes` with its defaults: batch 64, 32 px, 2 workers) with a callback that times the gap
   between `on_train_batch_end` and the next `on_train_batch_start` (where the loop fetches the next
   batch) against the whole step period; peer: the same fit on pre-made in-memory batches (no data
   work at all), interleaved. Training does not wait on data when the two gaps and step periods match.

    python bench/data_throughput.py [--quick] [--threads 1] [--wait-models autoencoder clip]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

SKIP = 2  # first step periods of a fit: worker start-up, optimizer state


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=64, help="shard-reading batch size (laion_subset default)")
    p.add_argument("--resolution", type=int, default=32, help="data.resolution of the shard reader (laion_subset default)")
    p.add_argument("--export-resolution", type=int, default=64, help="PNG size written to the shards")
    p.add_argument("--samples", type=int, default=2000, help="samples exported (shards of 250)")
    p.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "ldmkit-bench-cache"),
                   help="where exported shards are kept between runs")
    p.add_argument("--batches", type=int, default=20, help="batches per shard-reading epoch")
    p.add_argument("--rounds", type=int, default=3, help="epochs of each shard pipeline (after a warmup epoch)")
    p.add_argument("--fits", type=int, default=2, help="fits per data source (no warmup fit: the first steps of each are dropped)")
    p.add_argument("--wait-models", nargs="+", default=["autoencoder"], choices=["autoencoder", "clip"])
    p.add_argument("--fit-steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.rounds, args.fits, args.fit_steps = 12, 2, 1, 7
    return args


# ---- 1. shard reading -------------------------------------------------------------------------------

def export(args: argparse.Namespace, cache: Path) -> list[str]:
    """Shards written by `python -m ldmkit.data.export_shards`, kept in `cache` for later runs."""
    out = cache / f"shapes-{args.samples}-{args.export_resolution}px"
    command = [sys.executable, "-m", "ldmkit.data.export_shards", "data=shapes", f"out={out}",
               f"num_samples={args.samples}", "shard_size=250", f"data.resolution={args.export_resolution}"]
    if not (out / "done").is_file():
        start = time.perf_counter()
        subprocess.run([*command, "overwrite=true"], cwd=common.ROOT, check=True, capture_output=True, text=True)
        (out / "done").write_text(" ".join(command[1:]))
        print(f"exported in {time.perf_counter() - start:.0f} s: ", end="")
    shards = sorted(str(p) for p in out.glob("*.tar"))
    print(f"{args.samples} shapes samples at {args.export_resolution}px in {len(shards)} shards of 250 "
          f"(python {' '.join(command[1:])}), cached in {out}", flush=True)
    return shards


def ours_loader(args, shards: list[str]):
    from ldmkit.data.webdataset import WebDatasetDataModule

    dm = WebDatasetDataModule(batch_size=args.batch, num_workers=args.workers, resolution=args.resolution, seed=0,
                              train_shards=shards[:-1], val_shards=shards[-1:], samples_per_epoch=args.batches * args.batch,
                              hflip=True)
    dm.setup("fit")
    return dm.train_dataloader()


def _identity(x):
    return x


def _peer_collate(samples):
    import torch

    images, captions, meta = zip(*samples)
    return torch.stack(images), list(captions), list(meta)


def peer_loader(args, shards: list[str]):
    import torch
    import webdataset as wds
    from torchvision import transforms as T

    augment = T.Compose([
        T.Resize(args.resolution, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
        T.CenterCrop(args.resolution), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3),
    ])
    per_worker = args.batches * args.batch // args.workers
    dataset = (wds.WebDataset(shards[:-1], resampled=True, shardshuffle=False, nodesplitter=_identity)
               .shuffle(1000).decode("pil").to_tuple("png", "txt", "json").map_tuple(augment, _identity, _identity)
               .with_epoch(per_worker))
    return torch.utils.data.DataLoader(dataset, batch_size=args.batch, num_workers=args.workers, persistent_workers=True,
                                       drop_last=True, collate_fn=_peer_collate)


def epoch_throughput(loader, batch_size: int) -> common.Samples:
    """Images/s of one epoch, from the first batch's arrival (after worker start-up) to the last's."""
    first = last = None
    count = 0
    for _ in loader:
        last = time.perf_counter()
        if first is None:
            first = last
        else:
            count += 1
    out = common.Samples()
    out.wall.append((last - first) / (count * batch_size))  # seconds per image
    out.cpu.append(float("nan"))
    return out


def shard_reading(args) -> None:
    shards = export(args, Path(args.cache))
    loaders = {"ldmkit laion_subset": ours_loader(args, shards), "webdataset + torchvision": peer_loader(args, shards)}
    first_batch = next(iter(loaders["ldmkit laion_subset"]))
    print(f"batch: image {tuple(first_batch['image'].shape)} in [{first_batch['image'].min():.2f}, "
          f"{first_batch['image'].max():.2f}], {len(first_batch['caption'])} captions + attributes\n", flush=True)
    results = common.interleave({name: (lambda l=l: epoch_throughput(l, args.batch)) for name, l in loaders.items()},
                                repeats=args.rounds, warmup=1)
    peer = results["webdataset + torchvision"]
    rows = [[name, 1 / s.median, s.spread(), peer.median / s.median] for name, s in results.items()]
    print(f"## shard decode + augment, {args.workers} workers, batch {args.batch}, {args.export_resolution}px PNG -> "
          f"{args.resolution}px, {args.batches} batches per epoch, {args.rounds} epochs each")
    common.print_table(["pipeline", "images/s (median epoch)", "IQR", "throughput vs peer"], rows)


# ---- 2. waiting on data -----------------------------------------------------------------------------

class WaitClock:
    """Callback: per step, the gap from on_train_batch_end to the next on_train_batch_start (the loop
    fetching the next batch, plus Lightning's between-step bookkeeping) and the whole period."""

    def __init__(self):
        from lightning.pytorch import Callback

        self.starts: list[float] = []
        self.ends: list[float] = []
        outer = self

        class _Clock(Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                outer.starts.append(time.perf_counter())

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                outer.ends.append(time.perf_counter())

        self.callback = _Clock()

    def samples(self) -> tuple[common.Samples, common.Samples]:
        """(gaps, periods), the first SKIP steps dropped."""
        gaps, periods = common.Samples(), common.Samples()
        for i in range(SKIP, len(self.starts) - 1):
            gaps.wall.append(self.starts[i + 1] - self.ends[i])
            periods.wall.append(self.starts[i + 1] - self.starts[i])
        return gaps, periods


def wait_fraction(args, work: Path, model: str) -> list:
    from lightning.pytorch import Trainer

    overrides = [f"model={model}", "data=shapes", "logger=none"]
    if model == "clip":
        overrides.append("data.batch_size=128")  # the quickstart CLIP batch (conf/model/clip.yaml)
    cfg = common.compose(overrides, workdir=work / model)
    module, datamodule, in_memory = common.instantiate_stage(cfg, num_batches=4)

    def fit(source) -> tuple[common.Samples, common.Samples]:
        clock = WaitClock()
        trainer = Trainer(accelerator="cpu", devices=1, max_steps=args.fit_steps, max_epochs=-1, logger=False,
                          enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                          limit_val_batches=0, num_sanity_val_steps=0, callbacks=[clock.callback])
        if source == "memory":
            trainer.fit(module, train_dataloaders=common.InMemoryBatches(in_memory, args.fit_steps))
        else:
            trainer.fit(module, datamodule=datamodule)
        return clock.samples()

    gaps: dict[str, common.Samples] = {"datamodule": common.Samples(), "memory": common.Samples()}

    def run(source):
        gap, period = fit(source)
        gaps[source].wall.extend(gap.wall)
        return period

    periods = common.interleave({"datamodule": lambda: run("datamodule"), "memory": lambda: run("memory")},
                                repeats=args.fits, warmup=0)
    rows = []
    for source, label in (("datamodule", f"data=shapes, {datamodule.num_workers} workers"), ("memory", "in-memory batches")):
        g, p = gaps[source], periods[source]
        rows.append([f"{model}: {label}", p.median * 1e3, p.spread(), g.median * 1e3, max(g.wall) * 1e3,
                     sum(g.wall) / sum(p.wall), len(p.wall)])
    excess = (gaps["datamodule"].median - gaps["memory"].median) / periods["datamodule"].median
    rows.append([f"{model}: waiting on data (gap difference / step)", "", "", "", "", excess, ""])
    return rows, periods["memory"].median / periods["datamodule"].median


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    common.set_threads(args.threads)
    common.quiet_lightning()
    common.header("Data pipeline: shard throughput and training-loop data waits")
    work = Path(tempfile.mkdtemp(prefix="ldmkit-data-bench-"))
    shard_reading(args)
    rows, ratios = [], {}
    for model in args.wait_models:
        model_rows, ratios[model] = wait_fraction(args, work, model)
        rows.extend(model_rows)
    print(f"## training-loop data waits, quickstart models on data=shapes (batch, resolution, workers: the conf defaults), "
          f"{args.fit_steps} steps per fit ({args.fit_steps - SKIP - 1} timed), {args.fits} fits each, interleaved")
    common.print_table(["fit", "step period ms (median)", "IQR", "gap end->start ms (median)", "gap max ms",
                        "gap share of step time", "steps timed"], rows)
    for model, r in ratios.items():
        print(f"{model}: step time in-memory / with the datamodule = {r:.3f} (1.0: the loop never waits on data)")
    print(f"at end: {common.load_average()}")


if __name__ == "__main__":
    main()
