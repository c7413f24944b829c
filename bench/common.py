"""Shared helpers of the bench/ scripts: interleaved timing, medians and ratios, peak memory, tables.

Timing on a shared machine: candidates run in turn (A, B, A, B, ... after warmup rounds, the order
flipped every round so neither always follows the other), so load from other processes hits all of
them alike; we report medians (robust to the odd descheduled run) and ratios of medians, next to
the load average the run saw. CPU time (all threads of this process) is recorded beside wall time:
waiting for a busy CPU inflates wall time, not CPU time.

Peak memory is measured in a fresh child process per measurement (``run_child``), so nothing cached
by an earlier measurement hides a later one's allocations:

- CPU: the growth of the process's peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs``)
  over its RSS before the measured region. The child is started with glibc's mmap threshold pinned
  at 64 KiB, so freed tensors leave RSS at once instead of staying in the heap (pinned, every large
  allocation is a syscall: never time in such a child).
- CUDA: ``torch.cuda.max_memory_allocated`` over ``memory_allocated`` before the region.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024), "MALLOC_TRIM_THRESHOLD_": str(128 * 1024)}
RESULT_MARK = "BENCH_RESULT "


# ---- threads / environment ------------------------------------------------------------------------

def set_threads(threads: int | None) -> int:
    """torch intra-op threads and BLAS threads (numpy/scipy); returns torch's count. On an
    oversubscribed CPU, 1 thread avoids OpenMP spin-waits that waste the other processes' time."""
    import torch

    if threads:
        torch.set_num_threads(threads)
        try:
            from threadpoolctl import threadpool_limits

            threadpool_limits(limits=threads)
        except ImportError:  # pragma: no cover
            pass
    return torch.get_num_threads()


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def machine_summary(device: str = "cpu") -> str:
    import torch

    parts = [f"{cpu_model()}, {os.cpu_count()} cores", f"torch {torch.__version__}", f"{torch.get_num_threads()} torch threads"]
    if device.startswith("cuda") and torch.cuda.is_available():
        parts.insert(0, torch.cuda.get_device_name(device))
    return "; ".join(parts)


def load_average() -> str:
    """'1/5/15-min load averages on N cores': how busy the shared machine was."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.1f} / {five:.1f} / {fifteen:.1f} on {os.cpu_count()} cores"


def header(title: str, args: Any = None, device: str = "cpu") -> None:
    print(f"# {title}")
    print(f"date: {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"machine: {machine_summary(device)}")
    print(f"command: python {' '.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}")
    print(f"at start: {load_average()}")
    print(flush=True)


# ---- timing ---------------------------------------------------------------------------------------

def cpu_seconds() -> float:
    """CPU time of this process (all its threads, user + system); not of child processes."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Samples:
    """Wall and CPU seconds of each measured call of one candidate."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.wall)

    @property
    def median_cpu(self) -> float:
        return statistics.median(self.cpu)

    def spread(self) -> str:
        """Half the interquartile range of the wall times (the half range below 4 samples), relative to the median."""
        if len(self.wall) < 2:
            return "n/a"
        if len(self.wall) < 4:
            return f"±{50 * (max(self.wall) - min(self.wall)) / self.median:.0f}% (range)"
        q1, _, q3 = statistics.quantiles(self.wall, n=4)
        return f"±{50 * (q3 - q1) / self.median:.0f}%"


def interleave(
    candidates: dict[str, Callable[[], Any]],
    repeats: int,
    warmup: int = 1,
    sync: Callable[[], None] | None = None,
) -> dict[str, Samples]:
    """Call every candidate once per round (order reversed on odd rounds), `warmup` rounds untimed,
    then `repeats` timed rounds. `sync` (e.g. torch.cuda.synchronize) runs before each clock read, and
    a full garbage collection before each call.
    A candidate that returns `Samples` (e.g. per-step times it took inside a Trainer fit) has those
    recorded instead of the duration of the call."""
    names = list(candidates)
    results = {name: Samples() for name in names}
    sync = sync or (lambda: None)
    for round_index in range(warmup + repeats):
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order:
            gc.collect()  # garbage left by the previous candidate is not collected on this one's clock
            sync()
            wall, cpu = time.perf_counter(), cpu_seconds()
            own = candidates[name]()
            sync()
            if round_index < warmup:
                continue
            if isinstance(own, Samples):
                results[name].wall.extend(own.wall)
                results[name].cpu.extend(own.cpu)
            else:
                results[name].wall.append(time.perf_counter() - wall)
                results[name].cpu.append(cpu_seconds() - cpu)
    return results


def paired_ratio(peer: Samples, ours: Samples) -> float:
    """Median over the rounds of `interleave` of peer seconds / our seconds in the same round: a drift of the
    machine's speed during the run (another process, the VM's neighbours) moves both calls of a round alike and
    cancels, where a ratio of the two medians keeps what drift did not hit both halves of the run equally."""
    return statistics.median(p / o for p, o in zip(peer.wall, ours.wall, strict=True))


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def ratio(ours: float, peer: float) -> float:
    return ours / peer if peer else float("nan")


# ---- peak memory ----------------------------------------------------------------------------------

def _status_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


@contextlib.contextmanager
def peak_memory(device: str = "cpu") -> Iterator[dict[str, float]]:
    """Peak memory growth (MiB) of the block over the memory held when it starts, written to the
    yielded dict under `peak_mib` (also `held_mib`: memory before, `peak_total_mib`: the peak).
    CPU: meaningful in a `run_child` process only (see the module docstring)."""
    out: dict[str, float] = {}
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield out
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = _status_kib("VmRSS") * 1024
        yield out
        peak = _status_kib("VmHWM") * 1024
    out.update(held_mib=before / 2**20, peak_total_mib=peak / 2**20, peak_mib=(peak - before) / 2**20)


def run_child(script: str | Path, argv: Sequence[str], timeout: float = 600) -> Any:
    """Run `python script *argv` in a fresh process (glibc mmap threshold pinned, see above) and
    return the JSON it printed with `child_result`."""
    env = {**os.environ, **CHILD_ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    child = subprocess.run([sys.executable, str(script), *argv], env=env, capture_output=True, text=True, timeout=timeout)
    if child.returncode != 0:
        raise RuntimeError(f"memory child {script} {' '.join(argv)} failed ({child.returncode}):\n{child.stderr[-4000:]}")
    for line in reversed(child.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    raise RuntimeError(f"memory child {script} printed no result:\n{child.stdout[-2000:]}\n{child.stderr[-2000:]}")


def child_result(value: Any) -> None:
    print(RESULT_MARK + json.dumps(value), flush=True)


# ---- output ---------------------------------------------------------------------------------------

def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A markdown table (pastes into BENCHMARKS.md as is)."""
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
    print(flush=True)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:
            return "n/a"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
    return str(value)


def verdict(value: float, target: float, higher_is_better: bool = True) -> str:
    ok = value >= target if higher_is_better else value <= target
    return f"{value:.3f} ({'meets' if ok else 'MISSES'} target {'≥' if higher_is_better else '≤'} {target})"


# ---- configs --------------------------------------------------------------------------------------

def compose(overrides: Sequence[str] = (), config_name: str = "train", workdir: str | Path | None = None):
    """The real `conf/<config_name>.yaml` composed with Hydra overrides (as train.py would),
    output/data paths under `workdir` (a temporary folder by default)."""
    import tempfile

    from ldmkit.config import compose as compose_config

    workdir = Path(workdir or tempfile.mkdtemp(prefix="ldmkit-bench-"))
    return compose_config(overrides, config_name, config_dir=ROOT / "conf", workdir=workdir, root_dir=ROOT)


def instantiate_stage(cfg, num_batches: int, seed: int = 0) -> tuple[Any, Any, list[Any]]:
    """(module, datamodule, batches): `cfg.model` built after seeding, `cfg.data` set up for fit, and
    its first `num_batches` training batches (the loader, and its workers, released afterwards)."""
    import hydra
    import torch

    torch.manual_seed(seed)
    module = hydra.utils.instantiate(cfg.model)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("fit")
    iterator = iter(datamodule.train_dataloader())
    batches = [next(iterator) for _ in range(num_batches)]
    del iterator
    return module, datamodule, batches


# ---- Lightning ------------------------------------------------------------------------------------

class InMemoryBatches:
    """`length` batches cycling through pre-made `batches` (no DataLoader, no workers, no copies);
    a class, not a list: Lightning would take a list for a collection of dataloaders."""

    def __init__(self, batches: Sequence[Any], length: int) -> None:
        self.batches, self.length = list(batches), int(length)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[Any]:
        return (self.batches[i % len(self.batches)] for i in range(self.length))


def quiet_lightning() -> None:
    """No Trainer banners or dataloader-worker hints in the bench output."""
    import logging
    import warnings

    import lightning.pytorch  # noqa: F401  (sets its loggers' levels on import)

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for pattern in (".*does not have many workers.*", ".*train_dataloader.*", ".*val_dataloader.*",
                    ".*validation_step.*", ".*LeafSpec.*", ".*litlogger.*", ".*max_epochs.*"):
        warnings.filterwarnings("ignore", pattern)


# ---- bench scripts as modules ----------------------------------------------------------------------

def load_bench(name: str):
    """bench/<name>.py as a module (the bench scripts are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
