"""Paired comparison of LDM training recipes on `shapes` at the quickstart's budget (issues 15 and 16).

Every arm trains the quickstart's LDM stage (`experiment=quickstart_ldm`) on the *same* autoencoder and CLIP
artifacts, with its own overrides, for several seeds, each run on one CPU thread (``--jobs`` runs side by side).
Each trained model is then judged on the held-out prompts (`ldmkit.eval.heldout.sample_heldout_grid`, the
quickstart's own check: 36 colour x shape pairs x ``--seeds-per-prompt`` noise seeds per guidance scale), and
its generated images are kept (uint8, ``images_g*.pt``) so that FID can be computed on exactly those images
afterwards (``--fid``).

    python bench/objective_comparison.py --ae QS/autoencoder/artifact --clip QS/clip/artifact \\
        --judge QS/judge --out /tmp/cmp --arms vp_v flow_uniform flow_logit_normal flow_logit_normal_shift3 \\
        --seeds 42 43 44 --jobs 2
    python bench/objective_comparison.py ... --summary     # the table from what is on disk

A run whose ``result.json`` exists is not redone, so an interrupted comparison resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FLOW = ["process=rectified_flow", "model.loss.prediction=flow", "model.loss.weighting=uniform"]
DIT = ["backbone=dit", "~backbone.channel_mult", "+backbone.patch_size=2"]
# name -> (overrides, fraction of the quickstart's 1300 steps; <1 where a step costs more, for equal wall clock)
ARMS: dict[str, tuple[list[str], float]] = {
    "vp_v": ([], 1.0),  # the quickstart recipe: scaled_linear, v-prediction, min-SNR-5
    "vp_v_clip_skip2": (["model.clip_skip=2"], 1.0),  # the same, conditioned on the text tower's penultimate layer
    "vp_eps": (["model.loss.prediction=eps", "model.loss.weighting=uniform"], 1.0),
    "flow_uniform": ([*FLOW, "model.loss.timestep_sampling=uniform"], 1.0),
    "flow_logit_normal": ([*FLOW, "model.loss.timestep_sampling=logit_normal"], 1.0),
    "flow_logit_normal_shift3": ([*FLOW, "model.loss.timestep_sampling=logit_normal", "process.shift=3.0"], 1.0),
    "flow_uniform_shift3": ([*FLOW, "model.loss.timestep_sampling=uniform", "process.shift=3.0"], 1.0),
    "dit_vp_v": (DIT, 0.85),  # a DiT-tiny/2 step costs ~1.17x the UNet's (494 vs 403-442 ms, 1 thread)
    "dit_flow_logit_normal": ([*DIT, *FLOW, "model.loss.timestep_sampling=logit_normal"], 0.85),
}
QUICKSTART_STEPS = 1300  # the comparison's budget: the quickstart's LDM steps when it ran (1450 since, with clip_skip 2)
# the quickstart recipe as the comparison ran it; the arms' overrides come after these
BASE_OVERRIDES = ["model.clip_skip=1"]


def one_thread_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    return env


def train(run: Path, overrides: list[str], seed: int, steps: int, args) -> float:
    cmd = [sys.executable, str(ROOT / "train.py"), "experiment=quickstart_ldm", "logger=csv",
           f"model.autoencoder={args.ae}", f"model.text_encoder={args.clip}", f"seed={seed}",
           f"trainer.max_steps={steps}", f"hydra.run.dir={run}", *BASE_OVERRIDES, *overrides]
    start = time.perf_counter()
    with open(run.parent / f"{run.name}.train.log", "w") as log:
        subprocess.run(cmd, env=one_thread_env(), stdout=log, stderr=subprocess.STDOUT, check=True, cwd=ROOT)
    return time.perf_counter() - start


EVAL = r"""
import json, shutil, sys, time, torch
from pathlib import Path
import ldmkit.eval.heldout as heldout
run, judge, seeds_per_prompt = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
out = run / "heldout"
shutil.copytree(judge, out / "judge", dirs_exist_ok=True)
kept, score = [], heldout.colour_shape_accuracy
def keep(judge, images, attributes):   # the very images the judge scores, kept for FID
    kept.append(((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
    return score(judge, images, attributes)
heldout.colour_shape_accuracy = keep
start = time.perf_counter()
result = heldout.sample_heldout_grid(run / "artifact", out, seeds_per_prompt=seeds_per_prompt)
result["eval_seconds"] = time.perf_counter() - start
for g, images in zip((3.0, 5.0), kept):
    torch.save(images, out / f"images_g{g:g}.pt")
print(json.dumps(result))
"""


def evaluate(run: Path, args) -> dict:
    proc = subprocess.run([sys.executable, "-c", EVAL, str(run), str(args.judge), str(args.seeds_per_prompt)],
                          env=one_thread_env(), capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"evaluation of {run} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def do_run(arm: str, seed: int, args) -> dict:
    run = args.out / f"{arm}_s{seed}"
    done = run / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    overrides, fraction = ARMS[arm]
    steps = round(args.steps * fraction)
    train_s = None
    if not (run / "artifact" / "config.json").exists():
        train_s = train(run, overrides, seed, steps, args)
    result = {"arm": arm, "seed": seed, "steps": steps, "overrides": overrides, "train_seconds": train_s,
              "heldout": evaluate(run, args)}
    done.write_text(json.dumps(result, indent=1))
    print(f"{arm} seed {seed}: {summary_line(result)}", flush=True)
    return result


def accuracy(result: dict, guidance: str) -> float:
    return 100 * result["heldout"]["accuracy"][guidance]["colour+shape"]


def summary_line(result: dict) -> str:
    res = result["heldout"]["accuracy"]
    return ", ".join(f"{g}: {100 * r['colour+shape']:.1f}%" for g, r in res.items()) + \
        f" (train {result['train_seconds'] or float('nan'):.0f} s)"


def summarise(args) -> str:
    from ldmkit.eval.intervals import wilson_interval

    rows = ["| arm | seeds | steps | train s (1 thread) | colour+shape g=3, mean ± sd of seeds [pooled Wilson 95%] | g=5 | "
            "per seed (g=3 / g=5) |", "|---|---|---|---|---|---|---|"]
    for arm in args.arms:
        results = [json.loads(p.read_text()) for p in sorted(args.out.glob(f"{arm}_s*/result.json"))
                   if p.parent.name.rsplit("_s", 1)[0] == arm]
        if not results:
            continue
        cells = []
        for g in ("guidance_3", "guidance_5"):
            vals = [accuracy(r, g) for r in results]
            sd = statistics.stdev(vals) if len(vals) > 1 else float("nan")
            n = sum(r["heldout"]["num_images_per_setting"] for r in results)
            hits = round(sum(v / 100 * r["heldout"]["num_images_per_setting"] for v, r in zip(vals, results)))
            low, high = wilson_interval(hits, n)
            cells.append(f"{statistics.mean(vals):.1f} ± {sd:.1f} [{100 * low:.1f}–{100 * high:.1f}]")
        per_seed = "; ".join(f"{accuracy(r, 'guidance_3'):.1f} / {accuracy(r, 'guidance_5'):.1f}" for r in results)
        times = [r["train_seconds"] for r in results if r["train_seconds"]]
        t = f"{statistics.mean(times):.0f}" if times else "n/a"
        rows.append(f"| {arm} | {len(results)} | {results[0]['steps']} | {t} | {cells[0]} | {cells[1]} | {per_seed} |")
    return "\n".join(rows)


FID = r"""
import json, os, sys, torch
from pathlib import Path
from ldmkit.data.shapes import ShapesDataset
from ldmkit.eval.fid import FeatureStats
from ldmkit.eval.inception import InceptionFeatureExtractor, InceptionWeightsNotFoundError
out, runs = Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]]
try:
    extractor, weights = InceptionFeatureExtractor(), "the official Inception-v3 weights"
except InceptionWeightsNotFoundError:   # no internet here: a random-weight Inception (the tests' one), said so
    sys.path.insert(0, os.getcwd())
    from tests.eval.conftest import random_inception_state_dict
    path = out / "test-weight-inception" / "weights-inception-2015-12-05-6726825d.pth"
    path.parent.mkdir(exist_ok=True)
    if not path.exists():
        torch.save(random_inception_state_dict(seed=0), path)
    extractor, weights = InceptionFeatureExtractor(path), "a random-weight (test) Inception-v3: not comparable to published FIDs"
ref_path = out / "reference_stats.safetensors"
if ref_path.exists():
    ref = FeatureStats.load(ref_path)
else:   # real renders of single objects (the LDM's training distribution), held-out split
    ref = FeatureStats(extractor)
    real = ShapesDataset("test", size=2000, resolution=32, seed=4242, two_object_prob=0.0)
    for start in range(0, 2000, 100):
        ref.update(torch.stack([r["image"] for r in real.__getitems__(range(start, start + 100))]))
    ref.save(ref_path)
for run in runs:
    done = run / "fid.json"
    if done.exists():
        continue
    result = {"weights": weights}
    for images in sorted((run / "heldout").glob("images_g*.pt")):
        stats = FeatureStats(extractor)
        stats.update(torch.load(images, weights_only=True))
        result[images.stem.replace("images_", "")] = {"fid": stats.compute_fid(ref), "kid": stats.compute_kid(ref, subset_size=min(100, len(stats.features)))[0]}
    done.write_text(json.dumps(result, indent=1))
    print(run.name, json.dumps(result), flush=True)
"""


def fid(args) -> None:
    """FID/KID of every finished run's kept images against 2,000 real single-object renders."""
    runs = sorted(str(p.parent) for p in args.out.glob("*/result.json") if p.parent.name.rsplit("_s", 1)[0] in args.arms)
    subprocess.run([sys.executable, "-c", FID, str(args.out), *runs], env=one_thread_env(), check=True, cwd=ROOT)


JUDGE_AGAIN = r"""
import json, shutil, sys
from pathlib import Path
from ldmkit.eval.heldout import sample_heldout_grid
run, folder, name, steps, seeds = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
guidance_scales = tuple(float(g) for g in sys.argv[6].split(","))
sampler, _, spacing = name.partition("@")  # "dpmpp_2m@flow_sigmas": that sampler on that grid
out = run / folder / f"{name}_{steps}"
shutil.copytree(run / "heldout" / "judge", out / "judge", dirs_exist_ok=True)
r = sample_heldout_grid(run / "artifact", out, sampler=sampler, steps=steps, guidance_scales=guidance_scales,
                        seeds_per_prompt=seeds, **({"spacing": spacing} if spacing else {}))
print(json.dumps(r["accuracy"]))
"""
# sampler[@spacing] -> step counts (NFE = steps for these); @flow_sigmas: diffusers' DPM-Solver grid on flow models
NFE_GRID = {"euler": (4, 8, 16, 32), "dpmpp_2m": (4, 8, 16, 32), "dpmpp_2m@flow_sigmas": (4, 8, 16, 32)}


def judged_again(run: Path, folder: str, sampler: str, steps: int, guidance_scales: tuple[float, ...], args) -> dict:
    """A trained run's held-out accuracy with another sampler / step count ({"guidance_3": {...}, ...}), cached
    in `run/folder/{sampler}_{steps}.json`."""
    done = run / folder / f"{sampler}_{steps}.json"
    if not done.exists():
        cmd = [sys.executable, "-c", JUDGE_AGAIN, str(run), folder, sampler, str(steps), str(args.seeds_per_prompt),
               ",".join(f"{g:g}" for g in guidance_scales)]
        proc = subprocess.run(cmd, env=one_thread_env(), capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            raise RuntimeError(f"{run} {sampler} {steps}: {proc.stderr[-2000:]}")
        done.write_text(proc.stdout.strip().splitlines()[-1])
    return json.loads(done.read_text())


def _runs_on(arm: str, sampler: str) -> bool:
    """flow_sigmas is a grid of the flow process only: VP arms skip that series."""
    return not sampler.endswith("@flow_sigmas") or "process=rectified_flow" in ARMS[arm][0]


def nfe_curves(args) -> str:
    """Colour+shape accuracy (g = 3) against NFE for the first seed's model of each arm; a table and a plot."""
    runs = {arm: args.out / f"{arm}_s{args.seeds[0]}" for arm in args.arms}
    jobs = [(arm, s, n) for arm in args.arms for s, steps in NFE_GRID.items() for n in steps if _runs_on(arm, s)]
    with ThreadPoolExecutor(args.jobs) as pool:
        acc = dict(zip(jobs, pool.map(lambda j: judged_again(runs[j[0]], "nfe", j[1], j[2], (3.0,), args)["guidance_3"],
                                      jobs)))
    from ldmkit.eval.intervals import wilson_interval
    from ldmkit.eval.plots import line_plot_svg

    rows = ["| arm | sampler | NFE 4 | 8 | 16 | 32 |", "|---|---|" + "---|" * 4]
    for sampler, steps in NFE_GRID.items():
        series = {}
        for arm in (a for a in args.arms if _runs_on(a, sampler)):
            ys = [100 * acc[(arm, sampler, n)]["colour+shape"] for n in steps]
            n_images = 36 * args.seeds_per_prompt
            series[arm] = [(x, y, f"{arm} {sampler} NFE {x}: {y:.1f}%", None,
                            *(100 * v for v in wilson_interval(round(y / 100 * n_images), n_images)))
                           for x, y in zip(steps, ys)]  # NFE = steps for both samplers
            rows.append(f"| {arm} | {sampler} | " + " | ".join(f"{y:.1f}" for y in ys) + " |")
        if series:
            svg = line_plot_svg(series, title=f"{sampler}: colour+shape vs NFE (g = 3)", x_label="NFE",
                                y_label="colour+shape %", log_x=True)
            (args.out / f"nfe_{sampler.replace('@', '_')}.svg").write_text(svg)
    return "\n".join(rows)


def resample(args) -> str:
    """Every seed's model of each arm judged again with another sampler / step count (both guidance scales)."""
    sampler, steps = args.resample[0], int(args.resample[1])
    rows = [f"| arm | {sampler} {steps} steps: colour+shape g=3 | g=5 | per seed |", "|---|---|---|---|"]
    for arm in args.arms:
        per_seed = [judged_again(args.out / f"{arm}_s{seed}", "resample", sampler, steps, (3.0, 5.0), args)
                    for seed in args.seeds]
        cells = [f"{statistics.mean(100 * r[g]['colour+shape'] for r in per_seed):.1f}" for g in ("guidance_3", "guidance_5")]
        seeds = "; ".join(f"{100 * r['guidance_3']['colour+shape']:.1f} / {100 * r['guidance_5']['colour+shape']:.1f}"
                          for r in per_seed)
        rows.append(f"| {arm} | {cells[0]} | {cells[1]} | {seeds} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ae", type=Path, required=True)
    parser.add_argument("--clip", type=Path, required=True)
    parser.add_argument("--judge", type=Path, required=True, help="folder with the quickstart judge's weights")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44])
    parser.add_argument("--steps", type=int, default=QUICKSTART_STEPS, help="the quickstart's LDM steps (arms scale it)")
    parser.add_argument("--seeds-per-prompt", type=int, default=6, help="6 -> 216 images per guidance scale")
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side, one thread each")
    parser.add_argument("--summary", action="store_true", help="only print the table of what is on disk")
    parser.add_argument("--fid", action="store_true", help="FID/KID of the finished runs' kept images")
    parser.add_argument("--nfe", action="store_true", help="accuracy against NFE for the first seed of each arm")
    parser.add_argument("--resample", nargs=2, metavar=("SAMPLER", "STEPS"), help="judge every run again with this sampler")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.fid:
        fid(args)
        return
    if args.resample:
        print(resample(args))
        return
    if args.nfe:
        print(nfe_curves(args))
        return
    if not args.summary:
        # seed-major order: every arm gets its first seed before any gets its second
        jobs = [(arm, seed) for seed in args.seeds for arm in args.arms]
        with ThreadPoolExecutor(args.jobs) as pool:
            for future in [pool.submit(do_run, arm, seed, args) for arm, seed in jobs]:
                future.result()
    print(summarise(args))


if __name__ == "__main__":
    main()
