"""`make quickstart`: the three stages on `shapes`, then prompts the model never saw verbatim.

Runs the same commands a user would type (printed as it goes), each stage in its own run folder
under --out, skipping a stage whose artifact already exists (so an interrupted quickstart picks up
where it stopped; pass --force to retrain). The autoencoder and CLIP stages do not depend on each
other, so they run side by side, each on half of the CPU threads (one each on a 2-core machine,
where two one-thread processes get more done than one two-thread process); their output goes to
``--out/<stage>.log`` while the console shows one live line per lane (step / total, elapsed, ETA: read from
the ``progress.json`` each run writes, `ldmkit.progress`). The CLIP lane then trains the attribute classifier
that judges the samples. That lane ends first; from a fixed step of its own (the experiment's
``callbacks.thread_schedule.from_step``, `ldmkit.lit.threads`) the autoencoder runs on all the CPUs.
The LDM stage gets the whole machine. Finally the quickstart samples a grid of held-out prompts
and measures colour/shape accuracy with that independent classifier.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from ldmkit.config import project_root
from ldmkit.cpus import available_cpus
from ldmkit.progress import PROGRESS_FILE, LaneDisplay, StepStatus

ROOT = project_root()  # the checkout (where train.py is), or the current folder for an installed wheel
# `python train.py` in a checkout (the command a user types there), `python -m ldmkit.cli.train` otherwise
TRAIN = ["train.py"] if (ROOT / "train.py").is_file() else ["-m", "ldmkit.cli.train"]
JUDGE_RESOLUTION = 32  # data.resolution of the quickstart experiments


@dataclass
class Step:
    """One command of the quickstart; `done` is the file whose presence means it already ran (None:
    always run it; the command itself reuses what it finds)."""

    name: str
    args: list[str]
    done: Path | None
    env: dict[str, str] = field(default_factory=dict)
    progress: Path | None = None  # the progress.json the run writes (ldmkit.lit.progress.ProgressFile), if any

    def shown(self) -> str:
        env = " ".join(f"{k}={v}" for k, v in sorted(self.env.items()) if k == "OMP_NUM_THREADS")
        return (env + " " if env else "") + shlex.join(["python", *self.args])


class StageFailed(RuntimeError):
    pass


def thread_env(threads: int | None) -> dict[str, str]:
    if threads is None:
        return {}
    return {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}


def train_step(name: str, overrides: list[str], out: Path, threads: int | None = None) -> Step:
    run_dir = out / name
    return Step(name, [*TRAIN, *overrides, f"hydra.run.dir={run_dir}"], run_dir / "artifact" / "config.json",
                thread_env(threads), run_dir / PROGRESS_FILE)


def say(text: str) -> None:
    print(text, flush=True)


def run_step(step: Step, force: bool, log: Path | None = None, status: StepStatus | None = None,
             message: Callable[[str], None] = say) -> float:
    """Run `step` (output to `log`, or to the console); 0.0 when its result exists and not `force`. `status` (for
    the live display) follows the step; `message` prints the quickstart's own lines."""
    status = status or StepStatus(step.name, step.progress)
    if step.done is not None and step.done.is_file() and not force:
        status.finish("reused")
        message(f"[quickstart] {step.name}: reusing {step.done.parent} (pass --force to redo)")
        return 0.0
    where = f"   (output: {log})" if log else ""
    message(f"[quickstart] {step.name}: {step.shown()}{where}")
    status.start()
    script = step.args[0]
    command = [sys.executable, *([str(ROOT / script)] if script.endswith(".py") else [script]), *step.args[1:]]
    env = {**os.environ, **step.env}
    start = time.perf_counter()
    if log is None:
        result = subprocess.run(command, cwd=ROOT, env=env)
    else:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as handle:
            result = subprocess.run(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        status.finish("failed")
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:]) if log else ""
        raise StageFailed(f"{step.name} failed (exit {result.returncode}); command: {step.shown()}"
                          + (f"\nlast lines of {log}:\n{tail}" if log else ""))
    elapsed = time.perf_counter() - start
    status.finish("done")
    message(f"[quickstart] {step.name}: done in {elapsed:.0f} s")
    return elapsed


def run_lanes(lanes: Sequence[Sequence[Step]], out: Path, force: bool, *, stream: TextIO | None = None,
              interactive: bool | None = None, every: float = 30.0, poll: float = 1.0) -> dict[str, float]:
    """Run each lane's steps in order, the lanes at the same time. Every lane runs to its end (or its
    first failure) before a failure is raised, so the artifacts that did get made are kept and reused.

    Meanwhile the console (`stream`) shows one line per lane (`ldmkit.progress.LaneDisplay`): redrawn every
    `poll` seconds in place on a terminal, printed every `every` seconds elsewhere. The lanes' processes do
    nothing for it beyond writing their progress.json."""
    statuses = [[StepStatus(step.name, step.progress) for step in lane] for lane in lanes]
    display = LaneDisplay(statuses, stream, interactive=interactive, every=every)

    def run_lane(lane: Sequence[Step], status: Sequence[StepStatus]) -> dict[str, float]:
        return {step.name: run_step(step, force, out / f"{step.name}.log", s, display.message)
                for step, s in zip(lane, status)}

    timings: dict[str, float] = {}
    errors: list[str] = []
    with ThreadPoolExecutor(max_workers=len(lanes)) as pool:
        futures = [pool.submit(run_lane, lane, status) for lane, status in zip(lanes, statuses)]
        try:
            while wait(futures, timeout=poll).not_done:
                display.tick()
        finally:
            display.close()
        for future in futures:
            try:
                timings.update(future.result())
            except StageFailed as error:
                errors.append(str(error))
    if errors:
        raise StageFailed("\n\n".join(errors))
    return timings


def quickstart_steps(out: Path, logger: str, seed: int | None, lane_threads: int | None) -> tuple[Step, Step, Step, Step]:
    """The autoencoder, CLIP, judge and LDM steps; `seed` (None: the configs' 42) goes to the three trainings."""
    seeded = [] if seed is None else [f"seed={seed}"]
    # the CLIP lane ends before the autoencoder's: from the step where it does (the experiment's
    # callbacks.thread_schedule.from_step) the autoencoder takes the whole machine
    later = [] if lane_threads is None else [f"callbacks.thread_schedule.threads={available_cpus()}"]
    autoencoder = train_step("autoencoder", ["experiment=quickstart_autoencoder", f"logger={logger}", *seeded, *later],
                             out, lane_threads)
    clip = train_step("clip", ["experiment=quickstart_clip", f"logger={logger}", *seeded], out, lane_threads)
    judge = Step("judge", ["-m", "ldmkit.cli.judge", "--cache-dir", str(out / "judge"), "--resolution",
                           str(JUDGE_RESOLUTION)], None, thread_env(lane_threads))  # trains once, then reuses its file
    ldm = train_step("ldm", ["experiment=quickstart_ldm", f"logger={logger}", *seeded,
                             f"model.autoencoder={autoencoder.done.parent}", f"model.text_encoder={clip.done.parent}"], out)
    return autoencoder, clip, judge, ldm


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "quickstart")
    parser.add_argument("--force", action="store_true", help="retrain stages whose artifact exists")
    parser.add_argument("--logger", default="csv", help="logger config for the three runs (csv, wandb, tensorboard, none)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the three trainings (default: the configs' 42); a replicate needs its own --out")
    parser.add_argument("--sequential", action="store_true", help="run the autoencoder and CLIP stages one after the other")
    parser.add_argument("--progress-every", type=float, default=30.0, metavar="SECONDS",
                        help="when the output is not a terminal: print the lanes' progress lines this often")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    # The sampling at the end imports Lightning & co. (~15 s of one core): do it while the stages
    # train rather than after them.
    threading.Thread(target=importlib.import_module, args=("ldmkit.eval.heldout",), daemon=True).start()

    lane_threads = None if args.sequential else max(1, available_cpus() // 2)
    autoencoder, clip, judge, ldm = quickstart_steps(out, args.logger, args.seed, lane_threads)
    lanes = [[autoencoder, clip, judge]] if args.sequential else [[autoencoder], [clip, judge]]
    try:
        timings = run_lanes(lanes, out, args.force, every=args.progress_every)
        timings["autoencoder+clip+judge"] = time.perf_counter() - start
        timings["ldm"] = run_step(ldm, args.force)
    except StageFailed as error:
        print(f"[quickstart] {error}\n[quickstart] finished stages are kept; rerun the same command to continue.", file=sys.stderr)
        return 1
    sample_start = time.perf_counter()
    from ldmkit.eval.heldout import sample_heldout_grid

    result = sample_heldout_grid(ldm.done.parent, out)
    timings["sampling"] = time.perf_counter() - sample_start
    timings["total"] = time.perf_counter() - start
    summary = {"timings_s": {k: round(v, 1) for k, v in timings.items()}, **result}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"[quickstart] grid: {result['grid']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
