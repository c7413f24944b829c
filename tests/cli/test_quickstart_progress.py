"""The quickstart's live lane progress: the runs' progress.json (written by a Lightning callback), the watcher's
reader and status lines, in-place redraws on a terminal, plain periodic lines elsewhere, and a whole run of
fake lanes through `run_lanes`."""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import pytest
import torch

from ldmkit.cli.quickstart import Step, run_lanes
from ldmkit.progress import LaneDisplay, StepStatus, bar, clock, eta_seconds, read_progress, write_progress

ANSI = re.compile(r"\x1b\[")


def test_clock_eta_and_bar_read_like_a_progress_bar():
    assert [clock(s) for s in (0, 9.6, 151, 3725, None, -1)] == ["0:00", "0:10", "2:31", "1:02:05", "--:--", "--:--"]
    record = {"step": 600, "total": 1500, "step0": 0, "started": 1000.0, "time": 1100.0}
    assert eta_seconds(record) == pytest.approx(150.0)  # 6 steps/s, 900 left
    assert eta_seconds({**record, "step0": 500}) == pytest.approx(900.0)  # a resumed run: its own rate (1 step/s)
    assert eta_seconds({**record, "step": 0}) is None and eta_seconds({**record, "total": None}) is None
    assert bar(0.5, 10) == "━━━━━╺    " and bar(1.0, 10) == "━" * 10 and len(bar(0.0, 10)) == 10


def test_reader_ignores_missing_partial_and_earlier_runs_files(tmp_path):
    path = tmp_path / "progress.json"
    assert read_progress(path) is None
    path.write_text('{"step": 3, "tot')  # never produced by write_progress (atomic), but a reader must not fail
    assert read_progress(path) is None
    write_progress(path, {"step": 3, "total": 10})
    assert read_progress(path) == {"step": 3, "total": 10}
    assert [p.name for p in tmp_path.iterdir()] == ["progress.json"]  # no temporary file left behind
    os.utime(path, (1000.0, 1000.0))
    assert read_progress(path, since=2000.0) is None  # a previous run's file: not this run's progress


def test_status_lines_say_step_total_elapsed_and_eta():
    status = StepStatus("autoencoder", Path("progress.json"))
    assert status.describe(0.0) == "autoencoder: waiting"
    status.started, status.state = 100.0, "running"
    assert status.describe(110.0) == "autoencoder: starting  0:10 elapsed"
    judge = StepStatus("judge", state="running", started=100.0)  # writes no progress file
    assert judge.describe(112.0) == "judge: running  0:12 elapsed"
    status.record = {"step": 612, "total": 1500, "step0": 0, "started": 120.0, "time": 250.0, "phase": "train"}
    line = status.describe(251.0)
    assert "612/1500" in line and " 41%" in line and "2:31 elapsed" in line
    assert line.endswith("ETA 3:08")  # 888 steps at 130 s / 612 steps = 188.6 s from the record, 1 s ago
    status.record = {**status.record, "phase": "validate"}
    assert status.describe(251.0).endswith("(validating)")
    status.finish("done")
    status.ended = 400.0
    assert status.describe(500.0) == "autoencoder: done in 5:00"
    assert "reused" in StepStatus("clip", state="reused").describe(0) and "failed" in StepStatus("x", state="failed").describe(0)


def test_terminal_redraws_the_lane_lines_in_place(tmp_path):
    lanes = [[StepStatus("autoencoder", tmp_path / "a.json")], [StepStatus("clip", tmp_path / "c.json"), StepStatus("judge")]]
    for lane in lanes:
        lane[0].start()
    write_progress(tmp_path / "a.json", {"step": 5, "total": 10, "step0": 0, "started": 0.0, "time": 1.0})
    stream = io.StringIO()
    display = LaneDisplay(lanes, stream, interactive=True)
    display.tick()
    first = stream.getvalue()
    assert not ANSI.search(first) and first.count("\n") == 2 and "5/10" in first and "clip: starting" in first
    display.message("[quickstart] clip: done in 1 s")
    display.tick()
    rest = stream.getvalue()[len(first):]
    # each redraw goes back up over the two status lines and erases them; messages land above the block
    assert rest.count("\x1b[2A\r\x1b[J") == 2 and rest.index("clip: done in 1 s") < rest.index("5/10")


def test_non_terminal_prints_plain_lines_only_every_n_seconds():
    stream = io.StringIO()
    display = LaneDisplay([[StepStatus("a")]], stream, interactive=False, every=3600)
    display.tick()
    assert stream.getvalue() == ""  # not yet
    display.every = 0
    display.tick()
    assert stream.getvalue() == "[quickstart] a: waiting\n"


FAKE_LANE = """
import sys, time
from ldmkit.progress import write_progress
path, total = sys.argv[1], int(sys.argv[2])
start = time.time()
for step in range(1, total + 1):
    time.sleep(0.1)
    write_progress(path, {{"step": step, "total": total, "step0": 0, "started": start, "time": time.time(),
                          "phase": "train"}})
"""


def test_a_non_terminal_run_of_two_lanes_prints_their_progress(tmp_path):
    def fake(name: str, total: int) -> Step:
        progress = tmp_path / name / "progress.json"
        progress.parent.mkdir()
        return Step(name, ["-c", FAKE_LANE.format(), str(progress), str(total)], None, progress=progress)

    stream = io.StringIO()
    timings = run_lanes([[fake("autoencoder", 15)], [fake("clip", 10)]], tmp_path, force=False, stream=stream,
                        interactive=False, every=0.25, poll=0.05)
    out = stream.getvalue()
    assert set(timings) == {"autoencoder", "clip"} and not ANSI.search(out)
    lines = out.splitlines()
    status = [line for line in lines if re.search(r"\d+/(15|10) ", line)]
    assert any("autoencoder " in line for line in status) and any("clip " in line for line in status), out
    assert all("elapsed" in line for line in status)
    assert any("ETA" in line for line in status)
    assert "[quickstart] autoencoder: done in" in out and "[quickstart] clip: done in" in out


def test_progress_file_callback_writes_step_total_and_phases(tmp_path, monkeypatch):
    import lightning.pytorch as pl

    import ldmkit.lit.progress as progress_module
    from ldmkit.lit.progress import ProgressFile

    records = []
    real = progress_module.write_progress
    monkeypatch.setattr(progress_module, "write_progress", lambda path, record: (records.append(record), real(path, record)))

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).square().mean()

        def validation_step(self, batch, batch_idx):
            return None

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(32, 2)), batch_size=4)
    path = tmp_path / "run" / "progress.json"
    trainer = pl.Trainer(max_steps=6, val_check_interval=3, limit_val_batches=1, num_sanity_val_steps=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[ProgressFile(path, interval=0.0)], accelerator="cpu")
    trainer.fit(Tiny(), data, data)
    final = json.loads(path.read_text())
    assert final["step"] == 6 and final["total"] == 6 and final["step0"] == 0 and final["phase"] == "done"
    assert [r["step"] for r in records if r["phase"] == "validate"] == [3, 6]  # not the sanity check
    assert [r["step"] for r in records if r["phase"] == "train"][:4] == [0, 1, 2, 3]
    assert read_progress(path, since=final["started"]) == final


@pytest.mark.parametrize("stage", ["autoencoder", "clip"])
def test_quickstart_lanes_write_progress_into_their_run_folder(compose_cfg, stage):
    from ldmkit.config import instantiate_node
    from ldmkit.lit.progress import ProgressFile

    cfg = compose_cfg([f"experiment=quickstart_{stage}"])
    callback = instantiate_node(cfg.callbacks.progress_file)
    assert isinstance(callback, ProgressFile)
    assert callback.path == Path(cfg.paths.output_dir) / "progress.json"
