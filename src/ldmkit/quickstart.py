"""`make quickstart`: the three stages on `shapes`, then prompts the model never saw verbatim.

Runs the same commands a user would type (printed as it goes), each stage in its own
run folder under --out, skipping a stage whose artifact already exists (so an interrupted
quickstart picks up where it stopped; pass --force to retrain). Finally samples a grid of
held-out prompts and measures colour/shape accuracy with an independent attribute classifier.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_stage(name: str, overrides: list[str], out: Path, force: bool) -> tuple[Path, float]:
    run_dir = out / name
    artifact = run_dir / "artifact"
    if (artifact / "config.json").is_file() and not force:
        print(f"[quickstart] {name}: reusing {artifact} (pass --force to retrain)", flush=True)
        return artifact, 0.0
    command = [sys.executable, str(ROOT / "train.py"), *overrides, f"hydra.run.dir={run_dir}"]
    print(f"[quickstart] {name}: {shlex.join(['python', 'train.py', *overrides, f'hydra.run.dir={run_dir}'])}", flush=True)
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True)
    return artifact, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "quickstart")
    parser.add_argument("--force", action="store_true", help="retrain stages whose artifact exists")
    parser.add_argument("--logger", default="csv", help="logger config for the three runs (csv, wandb, tensorboard, none)")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    start = time.perf_counter()

    ae, timings["autoencoder"] = run_stage("autoencoder", ["experiment=quickstart_autoencoder", f"logger={args.logger}"], out, args.force)
    clip, timings["clip"] = run_stage("clip", ["experiment=quickstart_clip", f"logger={args.logger}"], out, args.force)
    ldm, timings["ldm"] = run_stage(
        "ldm", ["experiment=quickstart_ldm", f"logger={args.logger}", f"model.autoencoder={ae}", f"model.text_encoder={clip}"], out, args.force
    )
    sample_start = time.perf_counter()
    from ldmkit.eval.heldout import sample_heldout_grid

    result = sample_heldout_grid(ldm, out)
    timings["sampling"] = time.perf_counter() - sample_start
    timings["total"] = time.perf_counter() - start
    summary = {"timings_s": {k: round(v, 1) for k, v in timings.items()}, **result}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"[quickstart] grid: {result['grid']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
