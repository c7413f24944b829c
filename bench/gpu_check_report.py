"""The files `bench/gpu_check.py` writes: gpu_check.json (everything), gpu_check.md (the tables that go
into BENCHMARKS.md) and gpu_check.log (every part's output, in order). Three files: the device tool
brings back at most eight."""

from __future__ import annotations

import datetime
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

LOG_LIMIT = 12 * 2**20  # bytes of gpu_check.log (the device tool brings back files up to 16 MiB)


def summary(args, argv: list[str] | None, check, facts: dict) -> dict[str, Any]:
    parts = list(check.records.values())
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, "bench/gpu_check.py", *(sys.argv[1:] if argv is None else argv)]),
        "device": args.device, "quick": args.quick, "budget_s": args.budget,
        "seconds": round(time.perf_counter() - check.start, 1), "work": str(check.work),
        "machine": facts, "parts": parts,
    }


def write(out: Path, data: dict[str, Any], logs: Path) -> None:
    """The three files, each written to a temporary name and renamed (no half-written file)."""
    _atomic(out / "gpu_check.json", json.dumps(data, indent=2, default=str))
    _atomic(out / "gpu_check.md", markdown(data))
    chunks, size = [], 0
    for record in data["parts"]:
        path = record.get("log")
        text = Path(path).read_text(errors="replace") if path and Path(path).is_file() else ""
        chunk = f"\n===== {record['name']}: {record['status']} =====\n{text}"
        if size + len(chunk) > LOG_LIMIT:
            chunk = chunk[: max(0, LOG_LIMIT - size)] + "\n[gpu_check.log truncated]\n"
        chunks.append(chunk)
        size += len(chunk)
        if size >= LOG_LIMIT:
            break
    _atomic(out / "gpu_check.log", "".join(chunks))


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        if value != value:
            return "n/a"
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
    return "n/a" if value is None else str(value)


def markdown(data: dict[str, Any]) -> str:
    m = data["machine"] or {}
    lines = [f"# GPU check ({data['date']})", "",
             f"- command: `{data['command']}`",
             f"- device: {m.get('gpu') or m.get('cpu', '?')}; nvidia-smi: {m.get('nvidia_smi') or 'n/a'}",
             f"- torch {m.get('torch', '?')}, CUDA {m.get('cuda')}, cuDNN {m.get('cudnn')}, NCCL {m.get('nccl', 'n/a')}, "
             f"Python {m.get('python', '?')}; {m.get('cpu_count', '?')} CPU cores ({m.get('cpu', '?')})",
             f"- measured dense matmul peak ({m.get('matmul_size', '?')}^3): "
             + ", ".join(f"{k} {_fmt(v, 4)} TFLOP/s" for k, v in (m.get("matmul_peak_tflops") or {}).items()),
             f"- {data['seconds']:.0f} s of a {data['budget_s']:.0f} s budget", "",
             *(["**--quick: tiny sizes, a smoke run of the machinery; its figures are not benchmarks.**", ""]
               if data["quick"] else []),
             "## Parts", "", "| part | status | s | note |", "|---|---|---|---|"]
    for r in data["parts"]:
        note = r.get("reason") or r.get("error") or ""
        if r["status"] == "failed" and not note:
            note = (r.get("traceback") or r.get("log_tail") or "").strip().splitlines()[-1:] or [""]
            note = note[0]
        lines.append(f"| {r['name']} | {r['status']} | {_fmt(r.get('seconds'))} | {note.replace('|', '/')[:160]} |")
    lines += speed_table(data["parts"])
    for r in data["parts"]:
        if r.get("tables"):
            lines += ["", f"## {r['name']}", "", *r["tables"]]
    failures = [r for r in data["parts"] if r["status"] in ("failed", "timeout")]
    if failures:
        lines += ["", "## Failures", ""]
        for r in failures:
            lines += [f"### {r['name']} ({r['status']})", "", f"`{r.get('command', '')}`", "", "```",
                      (r.get("traceback") or r.get("log_tail") or r.get("error") or "").strip()[-4000:], "```", ""]
    packages = m.get("packages") or {}
    if packages:
        lines += ["", "## Packages as imported", ""] + [f"- {k}: {v}" for k, v in packages.items()]
    return "\n".join(lines) + "\n"


def speed_table(parts: list[dict]) -> list[str]:
    rows = []
    for r in parts:
        res = r.get("result") if r["group"] == "speed" else None
        if not res:
            continue
        for mode in res["modes"]:
            for impl, v in mode["impls"].items():
                rows.append(f"| {res['arch']} {res['preset']} | {'x'.join(map(str, res['latents']))} | {mode['mode']} | {impl}"
                            f"{' (compiled)' if v['compiled'] else ''} | {_fmt(v['samples_per_s'])} | {_fmt(v['ms_per_step'])} "
                            f"| {_fmt(v['peak_mib'])} | {_fmt(res['flops_per_sample'] / 1e9)} | {_fmt(v['tflops'])} "
                            f"| {v['mfu']:.1%} | {_fmt(v['compile_s'])} | {_fmt(mode['ratio']) if impl == 'ldmkit' else ''} |")
    if not rows:
        return []
    return ["", "## Training step (bf16 autocast, fused AdamW)", "",
            "| backbone | latents | mode | impl | samples/s | ms/step | peak MiB | GFLOP/sample | TFLOP/s | MFU | compile s | ratio vs diffusers |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|", *rows,
            "", "ratio: ldmkit samples/s over diffusers' (eager unless --peer-compile) in the same process, same weights."]
