"""Shared LightningDataModule: DataLoader settings, splits, and logging of skipped samples."""

from __future__ import annotations

import copy
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import RandomSampler as StatefulRandomSampler

from ldmkit.data.collate import collate_samples
from ldmkit.data.images import validate_resolution
from ldmkit.data.skips import SkipCounter

SPLITS = ("train", "val", "test")
_STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",), None: SPLITS}


def _positive_int(value: object, name: str, source: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{source}: {name} must be an int >= {minimum}, got {value!r}")
    return value


class ImageTextDataModule(L.LightningDataModule):
    """Base of every ldmkit datamodule; batches follow docs/CONVENTIONS.md (`collate_samples`).

    Subclasses implement `make_dataset(split, augment)` (map-style or iterable) and, when the
    source lives on disk, `check_source()` that raises an actionable error. Nothing is read or
    generated at construction time; `setup()` checks the source and builds the split datasets.

    DataLoaders: train shuffles map-style datasets with a `seed`-ed generator (Lightning swaps in
    a DistributedSampler under DDP) and drops the last partial batch; workers are persistent
    when `num_workers > 0`; `pin_memory` defaults to "CUDA is available". The train loader is a
    `ResumableDataLoader` (torchdata's StatefulDataLoader), whose position Lightning saves in every
    checkpoint and restores on resume, and map-style train datasets draw their augmentation from
    a generator that is part of that state (`SeededAugmentation`): a run resumed mid-epoch sees the
    batches, in the order and with the flips, that the uninterrupted run saw.

    Sources that can drop samples (`may_skip`) keep one `SkipCounter` per split in `self.skips`;
    `skipped_counts(split)` reads them and `log_skipped(module, split)` logs them. During
    `trainer.fit` a `SkippedSamplesLogger` callback is attached automatically (unless
    `log_skips_every_n_steps=0`) so the counts land in the run's logger as ``data/skipped_*``.
    """

    name = "data"
    min_resolution = 1
    may_skip = False
    collate_fn = staticmethod(collate_samples)  # batches -> docs/CONVENTIONS.md

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 2,
        resolution: int = 32,
        seed: int = 42,
        *,
        val_batch_size: int | None = None,
        pin_memory: bool | None = None,
        hflip: bool = False,
        log_skips_every_n_steps: int = 50,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()  # the subclass's constructor arguments too: stored in checkpoints
        self.batch_size = _positive_int(batch_size, "batch_size", self.name)
        self.val_batch_size = _positive_int(val_batch_size or batch_size, "val_batch_size", self.name)
        self.num_workers = _positive_int(num_workers, "num_workers", self.name, minimum=0)
        self.resolution = validate_resolution(resolution, self.min_resolution, self.name)
        self.seed = int(seed)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.hflip = bool(hflip)
        self.log_skips_every_n_steps = int(log_skips_every_n_steps)
        self.skips: dict[str, SkipCounter] = (
            {split: SkipCounter(f"{self.name}/{split}") for split in SPLITS} if self.may_skip else {}
        )
        self._datasets: dict[str, Dataset] = {}

    # ------------------------------------------------------------------ for subclasses

    def check_source(self) -> None:
        """Raise an actionable error when the data is missing (called by `setup`)."""

    def make_dataset(self, split: str, augment: bool = False) -> Dataset | None:
        """The split's dataset; None for a split the user configured to be empty (e.g. a 0 fraction)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ Lightning hooks

    def setup(self, stage: str | None = None) -> None:
        if stage not in _STAGE_SPLITS:
            raise ValueError(f"unknown stage {stage!r}; one of {tuple(_STAGE_SPLITS)}")
        self.check_source()
        for split in _STAGE_SPLITS[stage]:
            self.dataset(split)
        if stage == "fit":
            self._attach_skip_logger()

    def dataset(self, split: str) -> Dataset | None:
        """The dataset of `split` ("train", "val" or "test"), built on first use."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if split not in self._datasets:
            self.check_source()
            self._datasets[split] = self.make_dataset(split, augment=self.hflip and split == "train")
        return self._datasets[split]

    def train_dataloader(self) -> DataLoader:
        return self.dataloader("train")

    def val_dataloader(self) -> DataLoader | list:
        return self.dataloader("val")

    def test_dataloader(self) -> DataLoader | list:
        return self.dataloader("test")

    def dataloader(self, split: str) -> DataLoader | list:
        dataset = self.dataset(split)
        if dataset is None:
            return []  # an intentionally empty split: Lightning skips the loop
        train = split == "train"
        options: dict[str, Any] = {}
        rank = self.trainer.global_rank if self.trainer is not None else 0
        if isinstance(dataset, IterableDataset):
            if hasattr(dataset, "set_distributed") and self.trainer is not None:
                # Captured here, in the main process: DataLoader workers cannot see the process group.
                dataset.set_distributed(self.trainer.global_rank, self.trainer.world_size)
        elif train:
            dataset = SeededAugmentation(dataset, seed=self.seed, rank=rank)
            # The same permutation on every rank (Lightning's DistributedSamplerWrapper splits it); its
            # generator is its own, so that the state saved with the sampler is all that decides the order.
            options.update(sampler=StatefulRandomSampler(dataset, generator=torch.Generator().manual_seed(self.seed)))
        # Worker seeds from a generator of the loader's own, never from the global RNG: a val loader
        # built at another point of a resumed run (no sanity check) would otherwise shift the training noise.
        options.update(generator=torch.Generator().manual_seed(self.seed + 1))
        loader_class = ResumableDataLoader if train else DataLoader
        return loader_class(
            dataset,
            batch_size=self.batch_size if train else self.val_batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            drop_last=train,
            collate_fn=self.collate_fn,
            **options,
        )

    # ------------------------------------------------------------------ skipped samples

    def skipped_counts(self, split: str = "train") -> dict[str, int]:
        """Samples of `split` skipped so far in this process and its workers, per reason + ``total``."""
        counter = self.skips.get(split)
        return counter.totals() if counter is not None else {"total": 0}

    def log_skipped(self, module: L.LightningModule, split: str = "train") -> dict[str, int]:
        """Log ``data/skipped_<split>/<reason>`` (non-zero reasons + total) from a hook that may log."""
        counts = self.skipped_counts(split)
        values = {f"data/skipped_{split}/{k}": float(v) for k, v in counts.items() if v or k == "total"}
        per_step = split == "train"
        module.log_dict(values, on_step=per_step, on_epoch=not per_step, reduce_fx="max", batch_size=1)
        return counts

    def _attach_skip_logger(self) -> None:
        trainer = self.trainer
        if not self.may_skip or self.log_skips_every_n_steps <= 0 or trainer is None:
            return
        if not any(isinstance(cb, SkippedSamplesLogger) for cb in trainer.callbacks):
            trainer.callbacks.append(SkippedSamplesLogger(self.log_skips_every_n_steps))


class SeededAugmentation(Dataset):
    """A map-style dataset whose random draws (e.g. hflip with `torch.rand`) come from a generator of its
    own, one per DataLoader worker and rank, saved with the loader's state (`state_dict`, which
    StatefulDataLoader collects from every worker with each batch) and restored on resume. Without it,
    a worker's global RNG restarts from its seed when a run resumes mid-epoch, and the flips differ."""

    def __init__(self, dataset: Dataset, seed: int, rank: int = 0) -> None:
        self.dataset, self.seed, self.rank = dataset, int(seed), int(rank)
        self._generator: torch.Generator | None = None
        self._loaded: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:  # e.g. `attributes(index)` of the wrapped dataset
        if name.startswith("_") or name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def generator(self) -> torch.Generator:
        if self._generator is None:  # created in the process that draws (a worker, or the main process)
            info = get_worker_info()
            worker = 0 if info is None else info.id
            self._generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.rank) * 1_009 + worker)
            if self._loaded is not None:
                self._generator.set_state(self._loaded)
        return self._generator

    def __getitem__(self, index: int) -> Any:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        seed = int(torch.randint(0, 2**62, (), generator=self.generator()))
        with torch.random.fork_rng(devices=[]):  # the caller's global RNG is left as it was
            torch.manual_seed(seed)
            if callable(getattr(self.dataset, "__getitems__", None)):
                return list(self.dataset.__getitems__(indices))
            return [self.dataset[i] for i in indices]

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator().get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._loaded = state["generator"].clone()
        self._generator = None


class ResumableDataLoader(StatefulDataLoader):
    """torchdata's StatefulDataLoader, whose `state_dict()` Lightning stores in every checkpoint
    (`loops.fit_loop.state_dict.combined_loader`) and hands back on resume.

    One correction: without a length (an IterableDataset), Lightning's fetcher pre-fetches one batch
    to know which batch is the last, so at a checkpoint the loader has yielded one batch more than
    the trainer consumed; a resumed run would skip that batch. For such loaders the state is kept for
    the last two batches and the one the trainer consumed is returned."""

    _PREFETCHED = 1  # lightning.pytorch.loops.fetchers._PrefetchDataFetcher's default prefetch_batches

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        with warnings.catch_warnings():  # torchdata 0.11 calls torch.set_vital, deprecated in torch 2.x
            warnings.filterwarnings("ignore", message=".*set_vital.*")
            super().__init__(*args, **kwargs)

    def __iter__(self) -> Iterator[Any]:
        iterator = super().__iter__()
        try:
            len(self)
            self._states: deque | None = None
            return iterator
        except TypeError:
            return self._tracked(iterator)

    def _tracked(self, iterator: Iterator[Any]) -> Iterator[Any]:
        self._states = deque([copy.deepcopy(iterator.state_dict())], maxlen=self._PREFETCHED + 1)
        self._lag = self._PREFETCHED
        for batch in iterator:
            self._states.append(copy.deepcopy(iterator.state_dict()))
            yield batch
        self._lag = 0  # the fetcher hit the end: everything yielded was consumed
        self._states.append(copy.deepcopy(iterator.state_dict()))

    def state_dict(self) -> dict[str, Any]:
        states = getattr(self, "_states", None)
        if not states:
            return super().state_dict()
        return states[-1 - min(self._lag, len(states) - 1)]


class SkippedSamplesLogger(L.Callback):
    """Logs the datamodule's skipped-sample counts every `every_n_steps` and after val/test epochs."""

    def __init__(self, every_n_steps: int = 50) -> None:
        self.every_n_steps = max(1, int(every_n_steps))
        self._warned_total = 0

    @staticmethod
    def _datamodule(trainer: L.Trainer) -> ImageTextDataModule | None:
        dm = getattr(trainer, "datamodule", None)
        return dm if isinstance(dm, ImageTextDataModule) else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        dm = self._datamodule(trainer)
        if dm is not None and batch_idx % self.every_n_steps == 0:
            dm.log_skipped(pl_module, "train")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        dm = self._datamodule(trainer)
        if dm is None:
            return
        counts = dm.skipped_counts("train")
        if counts["total"] > self._warned_total:
            self._warned_total = counts["total"]
            nonzero = {k: v for k, v in counts.items() if v and k != "total"}
            rank_zero_warn(f"{dm.name}: {counts['total']} training samples skipped so far (rank 0): {nonzero}")

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        dm = self._datamodule(trainer)
        if dm is not None and not trainer.sanity_checking:
            dm.log_skipped(pl_module, "val")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        dm = self._datamodule(trainer)
        if dm is not None:
            dm.log_skipped(pl_module, "test")
