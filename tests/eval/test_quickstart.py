"""`make quickstart`'s orchestration: lanes run side by side, failures keep finished work, reruns reuse it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from ldmkit.cli.judge import main as judge_main
from ldmkit.cli.quickstart import StageFailed, Step, run_lanes, thread_env


def python_step(name: str, code: str, done: Path, threads: int | None = None) -> Step:
    return Step(name, ["-c", code], done, thread_env(threads))


def writes(path: Path, text: str = "ok") -> str:
    return f"import os, pathlib; pathlib.Path({str(path)!r}).write_text({text!r} + os.environ.get('OMP_NUM_THREADS', '-'))"


def test_lanes_run_their_steps_in_order_with_the_thread_budget(tmp_path):
    a, b1, b2 = tmp_path / "a", tmp_path / "b1", tmp_path / "b2"
    # b2 reads b1: the steps of one lane run in order
    second = f"import pathlib; p = pathlib.Path({str(b1)!r}); pathlib.Path({str(b2)!r}).write_text('after ' + p.read_text())"
    timings = run_lanes([[python_step("a", writes(a), a, threads=1)],
                         [python_step("b1", writes(b1), b1, threads=3), python_step("b2", second, b2)]], tmp_path, force=False)
    assert set(timings) == {"a", "b1", "b2"} and all(t > 0 for t in timings.values())
    assert a.read_text() == "ok1" and b1.read_text() == "ok3" and b2.read_text() == "after ok3"
    assert (tmp_path / "a.log").is_file()  # each step's output goes to its own log


def test_a_failing_lane_does_not_stop_the_other_and_names_its_log(tmp_path):
    good, never = tmp_path / "good", tmp_path / "never"
    failing = "import sys; print('useful diagnostics'); sys.exit(3)"
    lanes = [[python_step("bad", failing, tmp_path / "x"), python_step("after_bad", writes(never), never)],
             [python_step("good", writes(good), good)]]
    with pytest.raises(StageFailed) as info:
        run_lanes(lanes, tmp_path, force=False)
    message = str(info.value)
    assert "bad failed (exit 3)" in message and "useful diagnostics" in message and str(tmp_path / "bad.log") in message
    assert good.is_file()  # the other lane finished and its result stays for the rerun
    assert not never.exists()  # a lane stops at its first failure


def test_finished_steps_are_reused_unless_forced(tmp_path):
    done = tmp_path / "done"
    done.write_text("old")
    assert run_lanes([[python_step("s", writes(done, "new"), done)]], tmp_path, force=False) == {"s": 0.0}
    assert done.read_text() == "old"
    run_lanes([[python_step("s", writes(done, "new"), done)]], tmp_path, force=True)
    assert done.read_text().startswith("new")
    # done=None: the step decides for itself, so it always runs
    marker = tmp_path / "marker"
    for _ in range(2):
        timings = run_lanes([[python_step("t", f"import pathlib; p = pathlib.Path({str(marker)!r}); p.write_text(p.read_text() + 'x' if p.exists() else 'x')", None)]], tmp_path, force=False)
        assert timings["t"] > 0
    assert marker.read_text() == "xx"


def test_step_shows_the_command_a_user_would_type():
    step = Step("clip", ["train.py", "experiment=quickstart_clip"], Path("x"), thread_env(1))
    assert step.shown() == "OMP_NUM_THREADS=1 python train.py experiment=quickstart_clip"


def test_judge_command_trains_once_then_reuses(tmp_path, caplog):
    assert judge_main(["--cache-dir", str(tmp_path), "--resolution", "32", "--steps", "2"]) == 0
    (weights,) = tmp_path.glob("*.safetensors")
    stamp = weights.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="ldmkit.eval.attributes"):
        assert judge_main(["--cache-dir", str(tmp_path), "--resolution", "32", "--steps", "2"]) == 0
    assert weights.stat().st_mtime_ns == stamp
    assert f"reusing {weights}" in caplog.text


def test_seed_reaches_the_three_trainings_and_the_ldm_reads_the_lanes_artifacts(tmp_path):
    from ldmkit.cli.quickstart import quickstart_steps

    autoencoder, clip, judge, ldm = quickstart_steps(tmp_path, "csv", 43, 1)
    for step in (autoencoder, clip, ldm):
        assert "seed=43" in step.args and "logger=csv" in step.args
    assert not any(a.startswith("seed=") for a in judge.args)  # the judge is shared by replicates
    assert f"model.autoencoder={tmp_path / 'autoencoder' / 'artifact'}" in ldm.args
    assert f"model.text_encoder={tmp_path / 'clip' / 'artifact'}" in ldm.args
    default = quickstart_steps(tmp_path, "csv", None, 1)
    assert not any(a.startswith("seed=") for step in default for a in step.args)


def test_autoencoder_lane_takes_the_whole_machine_only_when_lanes_run_side_by_side(tmp_path, monkeypatch):
    from ldmkit.cli import quickstart

    monkeypatch.setattr(quickstart, "available_cpus", lambda: 6)
    autoencoder, clip, judge, ldm = quickstart.quickstart_steps(tmp_path, "csv", None, 3)
    assert autoencoder.env["OMP_NUM_THREADS"] == "3"  # its half until callbacks.thread_schedule.from_step
    assert "callbacks.thread_schedule.threads=6" in autoencoder.args
    assert not any("thread_schedule" in a for step in (clip, judge, ldm) for a in step.args)
    sequential = quickstart.quickstart_steps(tmp_path, "csv", None, None)  # --sequential: nothing runs beside it
    assert not any("thread_schedule" in a for step in sequential for a in step.args)
