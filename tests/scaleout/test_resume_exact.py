"""Mid-epoch resume is exact: the data position (torchdata StatefulDataLoader, saved by Lightning),
the augmentation draws and the resampled webdataset stream continue where the interrupted run was.

Fast tests drive the loaders directly; the slow ones kill -9 a real `train.py` between checkpoints,
in the middle of an epoch, and compare the resumed run's final weights bit for bit with an
uninterrupted run's.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from ldmkit.data.shapes import ShapesDataModule
from ldmkit.data.webdataset import WebDatasetDataModule, WebDatasetSamples
from tests.data.helpers import numbered_shards
from tests.scaleout.conftest import checkpoint_step, start_train, wait_for


class StepPacer(L.Callback):
    """Test-only: writes the global step to `path` after every step and sleeps, so that a test can
    kill the run at a step of its choosing (added with `+callbacks.pacer._target_=...`)."""

    def __init__(self, path: str, sleep: float = 0.5, from_step: int = 0) -> None:
        self.path, self.sleep, self.from_step = Path(path), sleep, from_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.path.write_text(str(trainer.global_step))
        if trainer.global_step >= self.from_step:
            time.sleep(self.sleep)


def _ids_and_images(samples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([s["attributes"]["id"] for s in samples]), torch.stack([s["image"] for s in samples])


def _batches(loader, count: int) -> list:
    """`count` batches, across epochs (a new iterator per epoch, as Lightning does)."""
    out: list = []
    while len(out) < count:
        for batch in loader:
            out.append(batch)
            if len(out) == count:
                break
    return out


def _assert_same(expected: list, got: list) -> None:
    assert len(expected) == len(got)
    for i, (a, b) in enumerate(zip(expected, got)):
        for x, y in zip(a.values() if isinstance(a, dict) else a, b.values() if isinstance(b, dict) else b):
            if isinstance(x, torch.Tensor):
                assert torch.equal(x, y), f"batch {i} differs"
            else:
                assert x == y, f"batch {i} differs"


@pytest.mark.parametrize("resampled", [True, False])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_webdataset_stream_continues_from_the_saved_position(tmp_path, resampled, num_workers):
    """Resampled and ordered streams, windowed shuffle and hflip: cut mid-epoch and in the second
    epoch, a new loader holding the saved state yields exactly the batches the first one would have."""
    urls = [str(p) for p in numbered_shards(tmp_path, 4, 7, size=8)]

    def loader():
        dataset = WebDatasetSamples(urls, 8, seed=5, resampled=resampled, shuffle_buffer=6,
                                    samples_per_epoch=30 if resampled else None, hflip=True)
        return StatefulDataLoader(dataset, batch_size=3, num_workers=num_workers, collate_fn=_ids_and_images,
                                  persistent_workers=num_workers > 0, drop_last=True)

    total = 14
    expected = _batches(loader(), total)
    assert len({int(i) for ids, _ in expected for i in ids}) > 15  # the stream covers the shards
    for cut in (4, 11):  # mid-epoch 0, and inside epoch 1
        first = loader()
        head = _batches(first, cut)
        second = loader()
        second.load_state_dict(first.state_dict())
        _assert_same(expected, head + _batches(second, total - cut))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_map_style_train_loader_resumes_batches_and_flips(num_workers):
    """shapes with hflip (a draw per sample): the datamodule's train loader, cut mid-epoch and in the
    next epoch, then restored into a new datamodule's loader, continues with the same batches."""

    def loader():
        dm = ShapesDataModule(batch_size=4, num_workers=num_workers, resolution=16, train_size=28, hflip=True, seed=3)
        return dm.train_dataloader()

    total = 16  # 7 batches per epoch
    expected = _batches(loader(), total)
    captions = [c for batch in expected for c in batch["caption"]]
    assert any("left" in c for c in captions) and len(set(captions)) > 10
    for cut in (3, 9):
        first = loader()
        head = _batches(first, cut)
        second = loader()
        second.load_state_dict(first.state_dict())
        _assert_same(expected, head + _batches(second, total - cut))


class _Recorder(L.LightningModule):
    """Records the sample ids of every training batch; one parameter so checkpoints hold something."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append([a["id"] for a in batch["attributes"]])
        return (self.w * batch["image"].mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _Crashed(Exception):
    pass


class _Crash(L.Callback):
    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            raise _Crashed  # the run stops without saving, as kill -9 would


def test_webdataset_resume_through_lightning_neither_skips_nor_replays(tmp_path):
    """Through Lightning (which pre-fetches a batch of an unsized loader before the checkpoint is
    taken): a run stopped at step 9 and resumed from its step-7 checkpoint trains on exactly the
    batches 8..N of the uninterrupted run, with 2 workers, across an epoch boundary."""
    urls = numbered_shards(tmp_path / "shards", 4, 7, size=8)
    pattern = str(tmp_path / "shards" / "{00000..00003}.tar")

    def run(root: Path, ckpt: str | None = None, crash: int | None = None):
        dm = WebDatasetDataModule(batch_size=2, num_workers=2, resolution=8, train_shards=pattern,
                                  val_shards=str(urls[0]), shuffle_buffer=5, samples_per_epoch=24, seed=1)
        model = _Recorder()
        save = L.pytorch.callbacks.ModelCheckpoint(dirpath=root, every_n_train_steps=7, save_top_k=-1, save_last=True)
        callbacks = [save] + ([_Crash(crash)] if crash else [])
        trainer = L.Trainer(accelerator="cpu", max_steps=20, limit_val_batches=0, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=callbacks, num_sanity_val_steps=0)
        try:
            trainer.fit(model, datamodule=dm, ckpt_path=ckpt, weights_only=True)
        except _Crashed:
            pass
        return model.seen

    expected = run(tmp_path / "reference")
    assert len(expected) == 20  # 12 batches per epoch (2 workers x 6): the run crosses an epoch boundary
    stopped = run(tmp_path / "killed", crash=9)
    assert stopped == expected[:9]
    resumed = run(tmp_path / "killed", ckpt=str(tmp_path / "killed" / "last.ckpt"))
    assert resumed == expected[7:]


# ------------------------------------------------------------------ real train.py, kill -9

SHAPES = ["data=shapes", "data.batch_size=4", "data.num_workers=2", "data.resolution=16", "data.train_size=28",
          "data.val_size=4", "data.test_size=4", "data.hflip=true"]
AUTOENCODER = ["model=autoencoder", "model.autoencoder.config.base_channels=8", "model.latent_stats_batches=1",
               "model.num_log_images=2"]
TRAINER = ["trainer.accelerator=cpu", "trainer.max_steps=12", "trainer.val_check_interval=4", "trainer.limit_val_batches=1",
           "trainer.log_every_n_steps=1", "callbacks.model_checkpoint.every_n_train_steps=6",
           "callbacks.rich_progress_bar.refresh_rate=0", "logger=csv"]


def _train_in_process(compose_cfg, output_dir: Path, *overrides: str):
    from omegaconf import open_dict

    from ldmkit.pipeline import train

    cfg = compose_cfg(list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return train(cfg)


@pytest.mark.slow
def test_kill9_mid_epoch_autoencoder_on_shapes_resumes_bit_exactly(tmp_path, compose_cfg):
    """Autoencoder on shapes (7 batches per epoch, 2 workers, hflip, validation every 4 batches), a
    checkpoint every 6 steps: `train.py` killed with SIGKILL at step 8-11 (mid-epoch 1, not a
    checkpoint), resumed with ckpt_path=last from step 6 (mid-epoch 0), reaches step 12 with the
    uninterrupted run's weights, bit for bit."""
    common = [*SHAPES, *AUTOENCODER, *TRAINER]
    torch.set_num_threads(1)
    reference = tmp_path / "reference"
    _train_in_process(compose_cfg, reference, *common)

    killed, log, step_file = tmp_path / "killed", tmp_path / "killed.log", tmp_path / "step"
    pacer = [f"+callbacks.pacer._target_={StepPacer.__module__}.StepPacer", f"+callbacks.pacer.path={step_file}", "+callbacks.pacer.from_step=6"]
    proc = start_train(*common, *pacer, f"hydra.run.dir={killed}", log=log)
    try:
        wait_for(lambda: step_file.exists() and int(step_file.read_text() or 0) >= 8, proc, 400, log, "step 8")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    killed_at = int(step_file.read_text())
    assert 8 <= killed_at < 12  # neither a checkpoint (6, 12) nor an epoch boundary (7, 14)
    assert checkpoint_step(killed / "checkpoints" / "last.ckpt") == 6

    _train_in_process(compose_cfg, killed, *common, "ckpt_path=last")
    final = torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)
    expected = torch.load(reference / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == expected["global_step"] == 12
    assert final["state_dict"].keys() == expected["state_dict"].keys()
    for key, value in expected["state_dict"].items():
        assert torch.equal(final["state_dict"][key], value), key
