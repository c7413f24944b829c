"""bench/gpu_check.py, the prepared GPU check: its runner records every part (ok, failed with its
traceback, timed out, skipped with a reason) and goes on; its plan finds backbones and processes from
conf/; and (slow) the whole check runs on the CPU with --device cpu --quick, so that its first GPU run
is not its first run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check  # noqa: E402
import gpu_check_plan as plan  # noqa: E402
from gpu_check_plan import Part  # noqa: E402

PY = sys.executable


def check(tmp_path, *extra: str) -> gpu_check.Check:
    args = gpu_check.parse_args(["--device", "cpu", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), *extra])
    args.out.mkdir(parents=True)
    return gpu_check.Check(args, [])


def python(code: str):
    return lambda: [PY, "-c", code]


def test_runner_records_results_failures_hangs_and_budget_and_goes_on(tmp_path):
    c = check(tmp_path, "--budget", "60", "--fail-part", "injected", "--fail-part", "hung:hang")
    ok = 'import json; print("BENCH_RESULT " + json.dumps({"x": 1})); print("| a | b |\\n|---|---|\\n| 1 | 2 |")'
    crash = "def inner():\n    raise ValueError('boom: the part broke')\ninner()"
    c.run_serial([
        Part("first", "sampling", python(ok), 30, min_seconds=0),
        Part("crashes", "train", python(crash), 30, min_seconds=0),
        Part("injected", "train", python("print('would have passed')"), 30, min_seconds=0),
        Part("hung", "train", python("print('fine')"), 2, min_seconds=0),
        Part("resume:crashes", "train", python("print('never')"), 30, needs=["crashes"], min_seconds=0),
        Part("needs cuda", "ddp", python("print('never')"), 30, skip="skipped: no CUDA"),
        Part("too long", "speed", python("print('never')"), 30, min_seconds=1000),
        Part("last", "train", python("print('still runs')"), 30, min_seconds=0),
    ])
    r = c.records
    assert r["first"]["status"] == "ok" and r["first"]["result"] == {"x": 1}
    assert r["first"]["tables"] == ["| a | b |\n|---|---|\n| 1 | 2 |"]
    assert r["crashes"]["status"] == "failed" and r["crashes"]["returncode"] == 1
    assert r["crashes"]["traceback"].startswith("Traceback") and "ValueError: boom: the part broke" in r["crashes"]["traceback"]
    assert "line 2, in inner" in r["crashes"]["traceback"]
    assert "RuntimeError: deliberate failure injected by --fail-part" in r["injected"]["traceback"]
    assert r["hung"]["status"] == "timeout" and r["hung"]["seconds"] < 30 and "killed" in r["hung"]["error"]
    assert r["resume:crashes"]["status"] == "skipped" and "crashes" in r["resume:crashes"]["reason"]
    assert r["needs cuda"] == {"name": "needs cuda", "group": "ddp", "status": "skipped", "reason": "skipped: no CUDA"}
    assert r["too long"]["status"] == "skipped" and "out of time budget" in r["too long"]["reason"]
    assert r["last"]["status"] == "ok"  # nothing above stopped the run
    # the summary is on disk after every part (a run killed from outside keeps what it finished)
    data = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert [p["name"] for p in data["parts"]] == list(r)
    md = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "| crashes | failed |" in md and "ValueError: boom: the part broke" in md and "| hung | timeout |" in md
    assert "===== last: ok =====" in (tmp_path / "out" / "gpu_check.log").read_text()


def test_parallel_runner_waits_for_needs(tmp_path):
    c = check(tmp_path)
    stamp = tmp_path / "order.txt"
    write = lambda tag: python(f"open({str(stamp)!r}, 'a').write({tag!r})")  # noqa: E731
    c.run_parallel([Part("b", "train", write("b"), 30, needs=["a"], min_seconds=0),
                    Part("a", "train", python(f"import time; time.sleep(1); open({str(stamp)!r}, 'a').write('a')"), 30,
                         min_seconds=0),
                    Part("c", "train", write("c"), 30, needs=["b"], min_seconds=0)], jobs=3)
    assert stamp.read_text() == "abc" and all(r["status"] == "ok" for r in c.records.values())


def test_only_and_skip_select_parts_by_prefix(tmp_path):
    c = check(tmp_path, "--only", "speed", "env", "--skip", "speed:mmdit")
    assert [n for n in ["env", "speed:unet", "speed:mmdit", "train:clip"] if c.selected(n)] == ["env", "speed:unet"]


def test_plan_discovers_backbones_and_processes(tmp_path, monkeypatch):
    monkeypatch.setattr(plan, "ROOT", tmp_path)
    assert plan.backbones() == [None] and plan.processes() == [(None, "v")]  # before the config groups exist
    (tmp_path / "conf" / "backbone").mkdir(parents=True)
    for name, text in {"unet": "arch: unet\npreset: tiny\n", "dit": "arch: dit\npreset: tiny\n",
                       "dit_xl": "defaults:\n  - dit\n  - _self_\npreset: XL\n", "mmdit": "arch: mmdit\n"}.items():
        (tmp_path / "conf" / "backbone" / f"{name}.yaml").write_text(text)
    (tmp_path / "conf" / "process").mkdir()
    for name in ("scaled_linear", "cosine", "rectified_flow"):
        (tmp_path / "conf" / "process" / f"{name}.yaml").write_text("name: x\n")
    assert plan.backbones() == ["unet", "dit", "mmdit"]  # presets (files with defaults) are not separate backbones
    assert plan.processes() == [("scaled_linear", "v"), ("rectified_flow", "flow")]


def test_plan_on_this_tree_trains_every_stage_and_skips_ddp_without_cuda(tmp_path):
    parts = plan.train_parts(tmp_path, "cpu", True, lambda: {}) + plan.eval_parts(tmp_path, "cpu", True)
    names = [p.name for p in parts]
    assert {"train:autoencoder", "resume:autoencoder", "train:clip", "resume:clip"} <= set(names)
    ldm = [n for n in names if n.startswith("train:ldm:")]
    assert len(ldm) == len(plan.backbones()) * len(plan.processes())
    assert any(n.startswith("eval:ldm:") for n in names)
    ae = parts[names.index("train:autoencoder")].command()
    assert ae[1].endswith("train.py") and any("NLayerDiscriminator" in a for a in ae) and "trainer.precision=bf16-mixed" in ae
    bench = plan.bench_parts(tmp_path, "cpu", True, 0)
    assert next(p for p in bench if p.name == "ddp").skip == "skipped: no CUDA"
    assert next(p for p in plan.bench_parts(tmp_path, "cuda", False, 1) if p.name == "ddp").skip.startswith("not run: 1 GPU")
    assert {p.name for p in bench if p.group == "speed"} == {f"speed:{a}" for a in plan.speed_archs()}


@pytest.mark.heavy
@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_whole_check_runs_on_the_cpu(tmp_path):
    """`bash bench/gpu_check.sh --device cpu --quick`: every part ok or skipped with a stated reason, and a
    deliberately failing part recorded with its traceback while the parts after it still run.
    ~15 train.py/eval.py/bench processes: ~6 CPU-minutes, most of it imports (torch, Lightning, open_clip)."""
    out = tmp_path / "out"
    env = {**os.environ, "GPU_CHECK_PYTHON": PY}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--device", "cpu", "--quick", "--budget", "3300",
                           "--out", str(out), "--work", str(tmp_path / "work"), "--fail-part", "sampling"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=3500)
    data = json.loads((out / "gpu_check.json").read_text())
    parts = {p["name"]: p for p in data["parts"]}
    assert proc.returncode == 1, proc.stdout[-3000:]  # the injected failure
    assert parts["sampling"]["status"] == "failed" and "deliberate failure" in parts["sampling"]["traceback"]
    for name, part in parts.items():
        if name == "sampling":
            continue
        if part["status"] == "skipped":
            assert part["reason"] == "skipped: no CUDA", (name, part)
        else:
            assert part["status"] == "ok", (name, part.get("traceback") or part.get("log_tail"))
    assert parts["ddp"]["status"] == "skipped"
    assert {"train:autoencoder", "resume:autoencoder", "train:clip", "resume:clip", "fid"} <= set(parts)
    assert any(n.startswith("eval:ldm:") and p["status"] == "ok" for n, p in parts.items())
    speed = [p["result"] for n, p in parts.items() if n.startswith("speed:")]
    assert speed and all(m["ratio"] > 0 and m["impls"]["ldmkit"]["mfu"] > 0 for r in speed for m in r["modes"])
    assert data["machine"]["torch"] and data["machine"]["matmul_peak_tflops"]["bf16"] > 0
    assert "| fid | ok |" in (out / "gpu_check.md").read_text()
