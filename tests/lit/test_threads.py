"""`ThreadSchedule`: the intra-op thread count changes at a fixed training step (the quickstart's autoencoder takes
the idle core when the CLIP lane is done), including for a run resumed past that step."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from ldmkit.lit.threads import ThreadSchedule


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Tiny(pl.LightningModule):
    """Appends to `threads` the thread count each training step runs with (read inside the step, after every
    batch-start hook)."""

    def __init__(self, threads: list[int]):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.threads = threads

    def training_step(self, batch, batch_idx):
        self.threads.append(torch.get_num_threads())
        return self.layer(batch[0]).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(tmp_path, schedule: ThreadSchedule, max_steps: int = 6, ckpt_path=None, save: bool = False) -> list[int]:
    threads: list[int] = []
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 2)), batch_size=4)
    callbacks = [schedule]
    if save:
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1))
    trainer = pl.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=save, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=callbacks, accelerator="cpu")
    trainer.fit(Tiny(threads), data, ckpt_path=ckpt_path)
    return threads


def test_threads_change_at_the_given_step(tmp_path, monkeypatch):
    monkeypatch.setattr("ldmkit.lit.threads.available_cpus", lambda: 8)
    schedule = ThreadSchedule(from_step=3, threads=2)
    assert fit(tmp_path, schedule) == [1, 1, 1, 2, 2, 2]
    assert schedule.switched_at == 3


def test_capped_at_the_cpus_the_process_may_use(tmp_path, monkeypatch):
    monkeypatch.setattr("ldmkit.lit.threads.available_cpus", lambda: 2)
    assert fit(tmp_path, ThreadSchedule(from_step=1, threads=16)) == [1, 2, 2, 2, 2, 2]


@pytest.mark.parametrize("schedule", [ThreadSchedule(), ThreadSchedule(from_step=2), ThreadSchedule(threads=2)])
def test_without_both_step_and_threads_nothing_changes(tmp_path, schedule):
    assert fit(tmp_path, schedule) == [1] * 6
    assert schedule.switched_at is None


def test_a_run_resumed_past_the_step_switches_at_its_first_step(tmp_path, monkeypatch):
    monkeypatch.setattr("ldmkit.lit.threads.available_cpus", lambda: 8)
    assert fit(tmp_path, ThreadSchedule(from_step=5, threads=2), max_steps=5, save=True) == [1] * 5
    torch.set_num_threads(1)  # a fresh process starts with the launcher's count again
    resumed = ThreadSchedule(from_step=3, threads=2)
    assert fit(tmp_path, resumed, max_steps=7, ckpt_path=str(tmp_path / "last.ckpt")) == [2, 2]
    assert resumed.switched_at == 5


@pytest.mark.parametrize("kwargs, word", [({"from_step": -1}, "from_step"), ({"from_step": 2.5}, "from_step"),
                                          ({"threads": 0}, "threads"), ({"threads": True}, "threads")])
def test_bad_values_are_refused_with_the_field_named(kwargs, word):
    with pytest.raises(ValueError, match=word):
        ThreadSchedule(**kwargs)


def test_the_quickstart_autoencoder_switches_before_its_last_step(compose_cfg):
    from ldmkit.config import instantiate_node

    cfg = compose_cfg(["experiment=quickstart_autoencoder", "callbacks.thread_schedule.threads=2"])
    schedule = instantiate_node(cfg.callbacks.thread_schedule)
    assert isinstance(schedule, ThreadSchedule) and schedule.active
    assert 0 < schedule.from_step < cfg.trainer.max_steps
    # without the quickstart's override the experiment runs with the threads it was started with
    plain = instantiate_node(compose_cfg(["experiment=quickstart_autoencoder"]).callbacks.thread_schedule)
    assert not plain.active
