"""Live progress of training runs that write to a log file (the quickstart's autoencoder and CLIP lanes).

A run writes a small JSON record (`write_progress`) to `<run>/progress.json`, replaced atomically at most once a
second (`ldmkit.lit.progress.ProgressFile`, a Lightning callback); a watcher in another process polls those files
at ~1 Hz (`LaneDisplay.tick`) and draws one status line per lane: step / total, elapsed, ETA, as a progress bar
would. On a terminal the lines are redrawn in place (ANSI cursor movement); elsewhere (a CI log, `| tee`) a plain
line per lane is printed every `every` seconds. The runs themselves do no extra work for the watcher beyond that
one small write a second. No Lightning import here: the watcher stays light.

Record fields: step (optimizer steps done), total (max steps, or null), step0 (the step training started from),
started / time (wall clock, s) of the first training step and of this record, phase (train | validate | done).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

PROGRESS_FILE = "progress.json"
BAR_WIDTH = 20


def write_progress(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Replace `path` with `record` atomically (a reader never sees half a record)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


def read_progress(path: str | os.PathLike, since: float = 0.0) -> dict[str, Any] | None:
    """The record at `path` if it was written at or after wall time `since` (an older one is a previous run's),
    else None; None too for a missing or unreadable file."""
    try:
        if os.stat(path).st_mtime < since:
            return None
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def clock(seconds: float | None) -> str:
    """m:ss, or h:mm:ss from an hour on (what Lightning's and rich's progress bars show)."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "--:--"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def eta_seconds(record: dict[str, Any]) -> float | None:
    """Seconds left at the run's mean rate since its first step (validation included), None before a step."""
    total, step, step0 = record.get("total"), record["step"], record.get("step0", 0)
    done, spent = step - step0, record.get("time", 0.0) - record.get("started", 0.0)
    if not total or done <= 0 or spent <= 0:
        return None
    return max(total - step, 0) * spent / done


def bar(fraction: float, width: int = BAR_WIDTH) -> str:
    filled = int(max(0.0, min(1.0, fraction)) * width)
    return "━" * filled + ("╺" + " " * (width - filled - 1) if filled < width else "")


@dataclass
class StepStatus:
    """What the watcher knows of one step of a lane: its state (waiting | running | done | reused | failed), its
    progress file (None: a step that writes none), wall-clock start/end and the last progress record read."""

    name: str
    progress_file: Path | None = None
    state: str = "waiting"
    started: float | None = None
    ended: float | None = None
    record: dict[str, Any] | None = field(default=None, repr=False)

    def start(self) -> None:
        self.started, self.state = time.time(), "running"

    def finish(self, state: str) -> None:
        self.ended, self.state = time.time(), state

    def poll(self) -> None:
        if self.state == "running" and self.progress_file is not None:
            self.record = read_progress(self.progress_file, since=self.started or 0.0) or self.record

    def describe(self, now: float) -> str:
        """`name ━━━╺   612/1500  41%  2:31 elapsed  ETA 3:38` (or the state when nothing is measured)."""
        elapsed = (self.ended or now) - self.started if self.started is not None else None
        if self.state in ("waiting", "reused", "failed"):
            return f"{self.name}: " + {"waiting": "waiting", "reused": "reused (already trained)",
                                        "failed": f"failed after {clock(elapsed)}"}[self.state]
        if self.state == "done":
            return f"{self.name}: done in {clock(elapsed)}"
        record = self.record
        if record is None:  # not yet training (imports, data), or a step that reports no progress
            return f"{self.name}: {'starting' if self.progress_file else 'running'}  {clock(elapsed)} elapsed"
        total, step = record.get("total"), record["step"]
        count = f"{step}/{total}" if total else f"step {step}"
        pct = f"  {100 * step / total:3.0f}%" if total else ""
        phase = "  (validating)" if record.get("phase") == "validate" else ""
        eta = eta_seconds(record)
        eta_text = f"  ETA {clock(eta - (now - record.get('time', now)) if eta is not None else None)}" if total else ""
        return (f"{self.name} {bar(step / total) if total else ''}  {count}{pct}  {clock(elapsed)} elapsed"
                f"{eta_text}{phase}")


class LaneDisplay:
    """One status line per lane (its current step), redrawn in place on a terminal, or printed every `every`
    seconds elsewhere; `message` prints a line above the status block. Safe to call from the lanes' threads."""

    def __init__(self, lanes: Sequence[Sequence[StepStatus]], stream: TextIO | None = None, *,
                 interactive: bool | None = None, every: float = 30.0, prefix: str = "[quickstart] ") -> None:
        self.lanes, self.stream, self.prefix, self.every = [list(lane) for lane in lanes], stream or sys.stdout, prefix, every
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self._drawn = 0  # status lines currently on screen (terminal)
        self._last_plain = time.monotonic()
        self._lock = threading.Lock()

    def current(self, lane: Sequence[StepStatus]) -> StepStatus:
        """The step a lane is at: the running one, else the first still waiting, else the last."""
        for step in lane:
            if step.state in ("running", "failed"):
                return step
        return next((s for s in lane if s.state == "waiting"), lane[-1])

    def lines(self, now: float | None = None) -> list[str]:
        now = time.time() if now is None else now
        out = []
        for lane in self.lanes:
            step = self.current(lane)
            step.poll()
            done = [s.describe(now) for s in lane if s is not step and s.state in ("done", "reused")]
            out.append(self.prefix + "; ".join([*done[-1:], step.describe(now)]))
        return out

    def _clear(self) -> None:
        if self._drawn:
            self.stream.write(f"\x1b[{self._drawn}A\r\x1b[J")  # up to the block's first line, erase to the end
            self._drawn = 0

    def _draw(self) -> None:
        width = shutil.get_terminal_size((120, 24)).columns - 1  # a wrapped line would break the cursor arithmetic
        lines = [line[:width] for line in self.lines()]
        self.stream.write("".join(line + "\n" for line in lines))
        self._drawn = len(lines)

    def message(self, text: str) -> None:
        with self._lock:
            if self.interactive:
                self._clear()
                self.stream.write(text + "\n")
                self._draw()
            else:
                self.stream.write(text + "\n")
            self.stream.flush()

    def tick(self) -> None:
        """Poll the progress files and redraw (terminal) or print when `every` seconds have passed (elsewhere)."""
        with self._lock:
            if self.interactive:
                self._clear()
                self._draw()
            elif time.monotonic() - self._last_plain >= self.every:
                self._last_plain = time.monotonic()
                self.stream.write("".join(line + "\n" for line in self.lines()))
            else:
                return
            self.stream.flush()

    def close(self) -> None:
        """Leave the final state on screen (terminal) and stop redrawing."""
        with self._lock:
            if self.interactive:
                self._clear()
                self._draw()
                self._drawn = 0
                self.stream.flush()
