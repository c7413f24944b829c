"""Fault-tolerance callbacks on the in-test tiny stage, in process (fast)."""

from __future__ import annotations

import os
import signal
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.loggers import WandbLogger

from ldmkit.lit.callbacks import (
    EXIT_PREEMPTED,
    LoggerRunIds,
    NonFiniteGuard,
    NonFiniteTrainingError,
    PreemptionCheckpoint,
    RNGStateCheckpoint,
    SharedRunDirCheck,
    grads_finite,
)
from ldmkit.lit.checkpointing import CHECKPOINT_KEY, AtomicModelCheckpoint, trainer_plugins
from tests.scaleout.test_checkpointing import SLURM_VARS
from tests.scaleout.tiny import TinyDataModule, TinyManualModule, TinyModule


def make_trainer(tmp_path: Path, max_steps: int, callbacks: list[Callback], **kwargs) -> Trainer:
    options = dict(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, val_check_interval=5, check_val_every_n_epoch=None, limit_val_batches=2,
                   num_sanity_val_steps=0, default_root_dir=tmp_path, plugins=trainer_plugins())
    options.update(kwargs)
    return Trainer(callbacks=callbacks, **options)


def fit(tmp_path: Path, max_steps: int, callbacks: list[Callback], ckpt_path: str | None = None, module_cls=TinyModule,
        module_kwargs: dict | None = None, **trainer_kwargs) -> tuple[Trainer, TinyModule]:
    seed_everything(0)
    module = module_cls(**(module_kwargs or {}))
    trainer = make_trainer(tmp_path, max_steps, callbacks, **trainer_kwargs)
    trainer.fit(module, datamodule=TinyDataModule(), ckpt_path=ckpt_path, weights_only=True)
    return trainer, module


def periodic_checkpoint(folder: Path) -> AtomicModelCheckpoint:
    return AtomicModelCheckpoint(dirpath=folder, filename="step_{step:03d}", every_n_train_steps=5, save_last=True, save_top_k=-1,
                                 auto_insert_metric_name=False, save_on_train_epoch_end=False)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, torch.Tensor]:
    tmp = tmp_path_factory.mktemp("uninterrupted")
    _, module = fit(tmp, 20, [RNGStateCheckpoint(), periodic_checkpoint(tmp / "ckpt")])
    return {k: v.clone() for k, v in module.state_dict().items()}


def resumed_state(tmp_path: Path, with_rng: bool) -> tuple[Trainer, dict[str, torch.Tensor]]:
    rng = [RNGStateCheckpoint()] if with_rng else []
    fit(tmp_path, 10, rng + [periodic_checkpoint(tmp_path / "ckpt")])  # "interrupted" right after the step-10 save
    last = tmp_path / "ckpt" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 10
    rng = [RNGStateCheckpoint()] if with_rng else []
    trainer, module = fit(tmp_path, 20, rng + [periodic_checkpoint(tmp_path / "ckpt")], ckpt_path=str(last))
    return trainer, module.state_dict()


def test_resume_reproduces_uninterrupted_run_exactly(tmp_path, uninterrupted):
    """Weights, AdamW moments, LR schedule, EMA, step and the noise drawn in training_step all resume exactly."""
    trainer, state = resumed_state(tmp_path, with_rng=True)
    assert trainer.global_step == 20
    for key, value in uninterrupted.items():
        assert torch.equal(state[key], value), key
    assert any(k.startswith("ema.shadow") for k in state)


def test_without_rng_states_the_resumed_run_diverges(tmp_path, uninterrupted):
    """Control for the test above: the training step draws noise, so a resume without RNG states differs."""
    _, state = resumed_state(tmp_path, with_rng=False)
    assert not torch.equal(state["net.0.weight"], uninterrupted["net.0.weight"])


def test_rng_states_load_weights_only_and_cover_all_generators(tmp_path):
    fit(tmp_path, 5, [RNGStateCheckpoint(), periodic_checkpoint(tmp_path)])
    states = torch.load(tmp_path / "last.ckpt", weights_only=True)[CHECKPOINT_KEY]["rng_states"]
    assert len(states) == 1 and set(states[0]) == {"torch", "cuda", "numpy", "python"}
    assert states[0]["numpy"]["keys"].shape == (624,) and len(states[0]["python"]["state"]) == 625


def test_validation_does_not_advance_training_rng():
    callback = RNGStateCheckpoint()
    trainer = SimpleNamespace(state=SimpleNamespace(fn="fit"))
    torch.manual_seed(3)
    callback.on_validation_start(trainer, None)
    torch.randn(10)
    callback.on_validation_end(trainer, None)
    after = torch.randn(3)
    torch.manual_seed(3)
    assert torch.equal(after, torch.randn(3))


class NaNWatcher(Callback):
    """Records the first layer's weight around the given steps."""

    def __init__(self, steps):
        self.steps, self.before, self.after = set(steps), {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step in self.steps:
            self.before[trainer.global_step] = pl_module.net[0].weight.detach().clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step - 1 in self.steps:
            self.after[trainer.global_step - 1] = pl_module.net[0].weight.detach().clone()


def test_nonfinite_guard_skips_the_step_and_counts(tmp_path):
    guard, watcher = NonFiniteGuard(max_consecutive=3), NaNWatcher([3, 4, 6])
    trainer, module = fit(tmp_path, 8, [guard, watcher], module_kwargs={"nan_steps": [3, 4]})
    assert guard.skipped == 2 and guard.consecutive == 0
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert torch.equal(watcher.before[3], watcher.after[3]) and torch.equal(watcher.before[4], watcher.after[4])
    assert not torch.equal(watcher.before[6], watcher.after[6])  # normal steps do update
    adam_state = trainer.optimizers[0].state[module.net[0].weight]
    assert int(adam_state["step"]) == 6  # 8 steps, 2 skipped: the moments never saw the NaN steps


def test_nonfinite_guard_without_it_weights_become_nan(tmp_path):
    """Control: the same NaN step without the guard poisons the weights."""
    _, module = fit(tmp_path, 5, [], module_kwargs={"nan_steps": [3]})
    assert not torch.isfinite(module.net[0].weight).all()


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_nonfinite_guard_stops_after_too_many_in_a_row(tmp_path, precision):
    guard = NonFiniteGuard(max_consecutive=3)
    with pytest.raises(NonFiniteTrainingError) as err:
        fit(tmp_path, 20, [guard], module_kwargs={"nan_steps": list(range(2, 20))}, precision=precision)
    message = str(err.value)
    assert "3 optimizer steps in a row" in message and "global step 4" in message
    assert "learning rate" in message and "bad data" in message
    assert "first parameter with a non-finite gradient is `net." in message
    if precision == "32-true":  # the advice fits the run: no "try precision=32-true" when it already is
        assert "try trainer.precision" not in message and "already uses precision=32-true" in message
    else:
        assert "precision=bf16-mixed: try trainer.precision=32-true" in message
    assert "trainer.gradient_clip_val=1.0" in message


@pytest.mark.parametrize("precision, clip, expected, unexpected", [
    ("32-true", None, ["already uses precision=32-true", "gradient_clip_val=1.0"], ["try trainer.precision"]),
    ("64-true", 1.0, ["already uses precision=64-true"], ["try trainer.precision", "gradient_clip_val"]),
    ("16-mixed", None, ["try trainer.precision=bf16-mixed", "32-true", "gradient_clip_val=1.0"], []),
    ("bf16-mixed", 0.5, ["try trainer.precision=32-true"], ["bf16-mixed (", "gradient_clip_val"]),
    ("bf16-true", None, ["try trainer.precision=32-true or bf16-mixed"], []),
])
def test_nonfinite_advice_depends_on_the_run_precision(precision, clip, expected, unexpected):
    from ldmkit.lit.callbacks import precision_advice

    advice = precision_advice(precision, clip)
    assert all(text in advice for text in expected), advice
    assert not any(text in advice for text in unexpected), advice


def test_nonfinite_guard_covers_manual_optimization(tmp_path):
    guard = NonFiniteGuard()
    trainer, module = fit(tmp_path, 12, [guard], module_cls=TinyManualModule, module_kwargs={"nan_steps": [2]})
    assert guard.skipped == 1  # the generator step at that batch; the critic's gradients stayed finite
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_grads_finite_detects_nan_and_inf():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, dtype=torch.bfloat16))
    a.grad, b.grad = torch.ones(3), torch.ones(2, dtype=torch.bfloat16)
    assert bool(grads_finite([a, b]))
    b.grad[1] = float("inf")
    assert not bool(grads_finite([a, b]))
    b.grad[1], a.grad[0] = 0.0, float("nan")
    assert not bool(grads_finite([a, b]))


class SendSignal(Callback):
    def __init__(self, signum: int, at_step: int):
        self.signum, self.at_step = signum, at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at_step:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_saves_last_checkpoint_and_stops(tmp_path, signum):
    previous = signal.getsignal(signum)
    preemption = PreemptionCheckpoint(dirpath=tmp_path / "ckpt")
    model_checkpoint = periodic_checkpoint(tmp_path / "ckpt")
    with pytest.raises(SystemExit) as exit_info:
        fit(tmp_path, 50, [preemption, model_checkpoint, SendSignal(signum, at_step=7)])
    assert exit_info.value.code == EXIT_PREEMPTED == 75
    assert preemption.received == signum
    last = tmp_path / "ckpt" / "last.ckpt"
    assert preemption.saved_path == str(last)
    assert torch.load(last, weights_only=True)["global_step"] == 8  # the step that was running, completed
    assert signal.getsignal(signum) == previous  # handlers handed back
    # resuming continues from there, and ModelCheckpoint keeps writing last.ckpt (not last-v1.ckpt)
    trainer, _ = fit(tmp_path, 15, [periodic_checkpoint(tmp_path / "ckpt")], ckpt_path=str(last))
    assert trainer.global_step == 15 and torch.load(last, weights_only=True)["global_step"] == 15
    assert not list((tmp_path / "ckpt").glob("last-v*.ckpt"))


def _fake_scontrol(tmp_path: Path, monkeypatch) -> Path:
    bin_dir, record = tmp_path / "bin", tmp_path / "scontrol_calls.txt"
    bin_dir.mkdir()
    script = bin_dir / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> {record}\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for key, value in SLURM_VARS.items():
        monkeypatch.setenv(key, value)
    return record


def test_slurm_requeue_signal_saves_then_requeues(tmp_path, monkeypatch):
    record = _fake_scontrol(tmp_path, monkeypatch)
    preemption = PreemptionCheckpoint(dirpath=tmp_path / "ckpt")
    with pytest.raises(SystemExit):
        fit(tmp_path, 50, [preemption, SendSignal(signal.SIGUSR1, at_step=3)])
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 4
    assert record.read_text().split() == ["requeue", "4242"]


def test_slurm_sigterm_saves_without_requeue(tmp_path, monkeypatch):
    record = _fake_scontrol(tmp_path, monkeypatch)
    with pytest.raises(SystemExit):
        fit(tmp_path, 50, [PreemptionCheckpoint(dirpath=tmp_path / "ckpt"), SendSignal(signal.SIGTERM, at_step=3)])
    assert (tmp_path / "ckpt" / "last.ckpt").is_file()
    assert not record.exists()  # SLURM requeues preempted jobs itself; only the requeue signal requeues


def test_signal_is_acted_on_at_optimizer_step_boundaries(tmp_path):
    preemption = PreemptionCheckpoint(dirpath=tmp_path / "ckpt")
    with pytest.raises(SystemExit):
        fit(tmp_path, 50, [preemption, SendSignal(signal.SIGTERM, at_step=3)], accumulate_grad_batches=4)
    # 5 batches per epoch, 4 per step: steps end after batches 3 and 4 of each epoch. The signal comes at
    # the first batch of step 3 (epoch 1, batch 4), which is also its last; and at step 7 (epoch 3, batch 0),
    # which is the first of 4: the save waits for the step to complete.
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 4
    preemption = PreemptionCheckpoint(dirpath=tmp_path / "ckpt2")
    with pytest.raises(SystemExit):
        fit(tmp_path, 50, [preemption, SendSignal(signal.SIGTERM, at_step=6)], accumulate_grad_batches=4)
    assert torch.load(tmp_path / "ckpt2" / "last.ckpt", weights_only=True)["global_step"] == 7


def test_logger_run_ids_records_wandb_id():
    logger = WandbLogger(offline=True, id="run42", project="t")
    checkpoint: dict = {}
    LoggerRunIds().on_save_checkpoint(SimpleNamespace(loggers=[logger], is_global_zero=True), None, checkpoint)
    assert checkpoint[CHECKPOINT_KEY]["wandb_run_id"] == "run42"


def test_shared_run_dir_check_names_both_folders(tmp_path):
    strategy = SimpleNamespace(broadcast=lambda obj, src=0: "/runs/a", reduce_boolean_decision=lambda d, all=True: d)
    trainer = SimpleNamespace(world_size=2, global_rank=1, default_root_dir=str(tmp_path), strategy=strategy)
    with pytest.raises(RuntimeError, match=r"rank 0 to '/runs/a'.*hydra.run.dir="):
        SharedRunDirCheck().setup(trainer, None, "fit")
    strategy.broadcast = lambda obj, src=0: str(tmp_path)
    SharedRunDirCheck().setup(trainer, None, "fit")  # same folder: fine
