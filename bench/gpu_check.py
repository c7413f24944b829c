"""The GPU check (issue 19): every stage through the real train.py / eval.py in bf16-mixed, the backbones'
training-step speed eager and compiled against diffusers, sampling and FID throughput, and an NCCL DDP
smoke run, in ONE run with a time limit per part and a total budget. A part that fails is recorded
with its traceback and the rest go on; a part that does not fit the budget left is recorded as skipped
(rerun it with --only). Writes gpu_check.json, gpu_check.md and gpu_check.log into --out.

    bash bench/gpu_check.sh --out $OUT --budget 480               # on the GPU machine (see BENCHMARKS.md)
    python bench/gpu_check.py --device cpu --quick --out /tmp/gc  # the same parts, tiny, on the CPU
    python bench/gpu_check.py --only speed:dit speed:mmdit --out $OUT  # a second call for what was left

Start it through bench/gpu_check.sh on a bare machine: that script installs the carried wheels first.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_check_plan as plan  # noqa: E402
from gpu_check_plan import ROOT, Part  # noqa: E402

RESULT_MARK = "BENCH_RESULT "
DELIBERATE_FAILURE = "raise RuntimeError('deliberate failure injected by --fail-part')"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda, or cpu (with --quick: the CI smoke run)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and few steps")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "outputs" / "gpu_check"))
    p.add_argument("--work", type=Path, default=None, help="run folders (default: a temporary folder)")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for all parts together")
    p.add_argument("--jobs", type=int, default=None, help="train/eval parts at a time (default 4 on CUDA, 1 on CPU)")
    p.add_argument("--only", nargs="+", default=None, help="run only parts whose name starts with one of these")
    p.add_argument("--skip", nargs="+", default=[], help="leave out parts whose name starts with one of these")
    p.add_argument("--fail-part", action="append", default=[], metavar="NAME[:hang]",
                   help="replace part NAME by a deliberate failure (or, with :hang, a hang): checks the recording")
    return p.parse_args(argv)


# ---- running one part -----------------------------------------------------------------------------

def traceback_of(text: str) -> str | None:
    """The last Python traceback in `text` (to its end), or None."""
    start = text.rfind("Traceback (most recent call last)")
    return text[start:].strip()[-8000:] if start >= 0 else None


def results_of(text: str) -> list:
    return [json.loads(line[len(RESULT_MARK):]) for line in text.splitlines() if line.startswith(RESULT_MARK)]


def tables_of(text: str) -> list[str]:
    """The markdown tables a bench script printed (bench/common.py print_table), as text."""
    return ["\n".join(m.group(0).splitlines()) for m in re.finditer(r"(?:^\|.*\|[ \t]*\n)+", text, re.M)]


def run_part(part: Part, timeout: float, log: Path, env: dict[str, str]) -> dict:
    record = {"name": part.name, "group": part.group, "started": datetime.datetime.now().isoformat(timespec="seconds")}
    try:
        command = part.command()
    except Exception as error:  # noqa: BLE001 - building the command is part of the part
        import traceback

        return {**record, "status": "failed", "seconds": 0.0, "error": f"{type(error).__name__}: {error}",
                "traceback": traceback.format_exc()}
    record["command"] = shlex.join(str(c) for c in command)
    start = time.perf_counter()
    with open(log, "w") as handle:
        handle.write(f"$ {record['command']}\n")
        handle.flush()
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=max(1.0, timeout))
            status = "ok" if code == 0 else "failed"
        except subprocess.TimeoutExpired:
            kill_group(proc)
            code, status = None, "timeout"
    text = log.read_text(errors="replace")
    record.update(status=status, returncode=code, seconds=round(time.perf_counter() - start, 1), timeout_s=round(timeout))
    found = results_of(text)
    if found:
        record["result"] = found[-1]
    if part.group in ("sampling", "fid"):
        record["tables"] = tables_of(text)
    if status != "ok":
        record["traceback"] = traceback_of(text)
        record["log_tail"] = "\n".join(text.splitlines()[-40:])
        if status == "timeout":
            record["error"] = f"no result within {timeout:.0f} s: killed (process group)"
    return record


def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the part's process group (DDP children, DataLoader workers too), SIGKILL after 10 s."""
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


# ---- the whole run --------------------------------------------------------------------------------

class Check:
    def __init__(self, args: argparse.Namespace, argv: list[str] | None = None) -> None:
        self.args, self.argv = args, argv
        self.start = time.perf_counter()
        self.deadline = self.start + args.budget
        self.work = (args.work or Path(tempfile.mkdtemp(prefix="ldmkit-gpu-check-"))).resolve()
        self.logs = self.work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.records: dict[str, dict] = {}
        self.lock, self.fallback_lock = threading.Lock(), threading.Lock()
        self.fallback_artifacts: dict[str, Path] | None = None
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH")])),
                    "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
                    "LDMKIT_ROOT": str(ROOT)}
        if not args.device.startswith("cuda"):
            self.env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

    def selected(self, name: str) -> bool:
        if any(name.startswith(s) for s in self.args.skip):
            return False
        return self.args.only is None or any(name.startswith(s) for s in self.args.only)

    def fallback(self) -> dict[str, Path]:
        """Tiny random stage artifacts (tests/artifacts.py) for the LDM runs when a stage run failed."""
        with self.fallback_lock:
            if self.fallback_artifacts is None:
                folder = self.work / "fallback_artifacts"
                code = ("import sys; from pathlib import Path; from tests.artifacts import write_autoencoder, write_clip; "
                        "f = Path(sys.argv[1]); write_autoencoder(f / 'autoencoder'); write_clip(f / 'clip')")
                subprocess.run([plan.PY, "-c", code, str(folder)], cwd=ROOT, env=self.env, check=True, timeout=300)
                self.fallback_artifacts = {"autoencoder": folder / "autoencoder", "clip": folder / "clip"}
            return self.fallback_artifacts

    def run(self, part: Part) -> dict:
        if not self.selected(part.name):
            return {"name": part.name, "group": part.group, "status": "skipped", "reason": "not selected (--only/--skip)"}
        if part.skip:
            return {"name": part.name, "group": part.group, "status": "skipped", "reason": part.skip}
        failed_needs = [n for n in part.needs if self.records.get(n, {}).get("status") != "ok"]
        if failed_needs and part.name.startswith(("resume:", "eval:")):  # LDM runs fall back to tiny artifacts instead
            return {"name": part.name, "group": part.group, "status": "skipped",
                    "reason": f"needs {', '.join(failed_needs)}, which did not succeed"}
        left = self.deadline - time.perf_counter() - 15  # keep time for the summary
        if left < part.min_seconds:
            return {"name": part.name, "group": part.group, "status": "skipped",
                    "reason": f"out of time budget ({max(left, 0):.0f} s left; rerun with --only {part.name})"}
        for spec in self.args.fail_part:
            name, _, mode = spec.partition(":")
            if name == part.name:
                code = "import time; time.sleep(10**6)" if mode == "hang" else f"def part():\n    {DELIBERATE_FAILURE}\npart()"
                part = Part(part.name, part.group, lambda code=code: [plan.PY, "-c", code], part.timeout, part.needs)
        log = self.logs / (re.sub(r"[^A-Za-z0-9_.-]", "_", part.name) + ".log")
        print(f"[gpu_check] {part.name}: start (limit {min(part.timeout, left):.0f} s)", flush=True)
        record = run_part(part, min(part.timeout, left), log, self.env)
        record["log"] = str(log)
        print(f"[gpu_check] {part.name}: {record['status']} in {record.get('seconds', 0)} s", flush=True)
        return record

    def save(self) -> None:
        """The summary files as they stand: written after every part, so a run killed from outside
        (the device call's time limit) still leaves every finished part's result in --out."""
        import gpu_check_report as report

        with self.lock:
            facts = self.records.get("env", {}).get("result", {})
            report.write(self.args.out, report.summary(self.args, self.argv, self, facts), self.logs)

    def record(self, name: str, record: dict) -> None:
        self.records[name] = record
        self.save()

    def run_serial(self, parts: list[Part]) -> None:
        for part in parts:
            self.record(part.name, self.run(part))

    def run_parallel(self, parts: list[Part], jobs: int) -> None:
        """Parts in order, up to `jobs` at a time, each once all its `needs` have finished."""
        pending, running = list(parts), {}
        names = {p.name for p in parts}
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            while pending or running:
                for part in list(pending):
                    if len(running) >= jobs:
                        break
                    if all(n in self.records or n not in names for n in part.needs):
                        pending.remove(part)
                        running[pool.submit(self.run, part)] = part
                if not running:  # needs that can never finish (a cycle): record and stop
                    for part in pending:
                        self.records[part.name] = {"name": part.name, "group": part.group, "status": "skipped",
                                                   "reason": "its needs never finished"}
                    return
                done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for future in done:
                    part = running.pop(future)
                    self.record(part.name, self.result(future, part))

    @staticmethod
    def result(future: Future, part: Part) -> dict:
        try:
            return future.result()
        except Exception as error:  # noqa: BLE001 - a broken runner for one part must not stop the others
            import traceback

            return {"name": part.name, "group": part.group, "status": "failed", "error": repr(error),
                    "traceback": "".join(traceback.format_exception(error))}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    check = Check(args, argv)
    quick, device = args.quick, args.device
    print(f"[gpu_check] device {device}{' (quick)' if quick else ''}, budget {args.budget:.0f} s, work {check.work}, "
          f"out {args.out}", flush=True)
    env_part = Part("env", "env", lambda: [plan.PY, str(ROOT / "bench" / "gpu_check_env.py"), "--device", device], 120)
    check.run_serial([env_part])
    facts = check.records["env"].get("result", {})
    if device.startswith("cuda") and facts and not facts.get("cuda_available"):
        print("[gpu_check] --device cuda but torch sees no CUDA device: the CUDA parts will fail", flush=True)
    jobs = args.jobs or (4 if device.startswith("cuda") else 1)
    check.run_parallel(plan.train_parts(check.work, device, quick, check.fallback) + plan.eval_parts(check.work, device, quick), jobs)
    bench = plan.bench_parts(check.work, device, quick, facts.get("cuda_device_count"))
    first, rest = bench[:1], bench[1:]  # the UNet's speed first, then sampling / FID / DDP, then the transformers'
    rest = [p for p in rest if p.group != "speed"] + [p for p in rest if p.group == "speed"]
    check.run_serial(first + rest)

    check.save()
    counts = {s: sum(r["status"] == s for r in check.records.values()) for s in ("ok", "failed", "timeout", "skipped")}
    print(f"[gpu_check] {counts} in {time.perf_counter() - check.start:.0f} s; wrote {args.out / 'gpu_check.md'}", flush=True)
    return 0 if counts["failed"] == counts["timeout"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
