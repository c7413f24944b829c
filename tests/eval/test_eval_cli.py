"""`eval.py` through its real config (conf/eval.yaml): report, PNG parameters, txt2img, bad input,
and 2 processes against 1 (slow: a subprocess launching `python eval.py ... devices=2`)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ldmkit.artifacts import weights_hash
from ldmkit.eval.pngmeta import read_png_parameters
from ldmkit.eval.plan import EvalConfigError
from tests.conftest import CONF_DIR, ROOT

SETTINGS = [(s, n, g) for s in ("ddim", "euler_a") for n in (2, 3) for g in (1.0, 3.0)]
MEASURED = ("sec_per_image", "peak_mem_mb")  # wall-clock facts, not functions of the images
TINY = ["logger=none", "data.num_workers=0", "data.batch_size=8", "metrics.prompt_accuracy.judge_steps=5"]


def comparable(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in MEASURED}


def compose_eval(overrides: list[str], out: Path):
    """conf/eval.yaml composed like tests/conftest.py's compose_cfg, every path inside `out`."""
    from omegaconf import open_dict

    from ldmkit.config import compose

    cfg = compose(overrides, "eval", config_dir=CONF_DIR, set_hydra_config=True, workdir=out, root_dir=ROOT)
    if not any(o.startswith("cache_dir=") for o in overrides):
        with open_dict(cfg):
            cfg.cache_dir = str(out / "cache")
    return cfg


def run_eval(overrides: list[str], out: Path):
    from ldmkit.pipeline import evaluate

    return evaluate(compose_eval(overrides, out))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """Shared by the runs of this module: the judge is trained once."""
    return tmp_path_factory.mktemp("eval_cache")


@pytest.fixture(scope="module")
def report_run(tiny_artifacts, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("report_run")
    metrics, objects = run_eval([
        f"ckpt={tiny_artifacts['ldm']}", "samplers=[ddim,euler_a]", "steps=[2,3]", "guidance=[1,3]",
        "num_samples=5", "batch_size=2", "base_seed=100", "negative_prompt=blurry", "metrics.fid=false",
        "save_images=true", "grid_prompts=3", f"cache_dir={cache_dir}", *TINY,
    ], out)
    return out / "run", metrics, objects


def test_report_holds_every_setting_with_its_measurements(report_run, tiny_artifacts):
    run, metrics, objects = report_run
    markdown = (run / "report.md").read_text()
    page = (run / "report.html").read_text()
    table = [line for line in markdown.splitlines() if line.startswith(("| ddim |", "| euler_a |"))]
    cells = [row for row in ([c.strip() for c in line.strip("|").split("|")] for line in table) if len(row) == 12]
    assert sorted((c[0], int(c[1]), float(c[2])) for c in cells) == sorted(SETTINGS)
    for c in cells:
        assert c[3] == c[1]  # NFE: one denoiser evaluation per step for ddim and euler_a, CFG or not
        assert c[4] == "n/a" and c[5] == "n/a"  # FID/KID off
        assert re.fullmatch(r"\d+\.\d\d", c[6])  # CLIP score
        assert re.fullmatch(r"\d+\.\d% \[\d+\.\d–\d+\.\d\]( ≈)?", c[9])  # accuracy with its Wilson interval
        assert c[10] != "n/a" and c[11] != "n/a"  # s/image, memory
    assert page.count("<tr><td") == len(SETTINGS) and page.count("<figure>") == len(SETTINGS)
    # which model scored, and how NFE / memory were measured, are in both files
    for text in (markdown, page):
        assert f"clip artifact {tiny_artifacts['clip']}" in text and "own text encoder" in text
        assert "NFE = denoiser evaluations per image" in text and "RSS high-water" in text
    rows = json.loads((run / "metrics.json").read_text())["rows"]
    assert len(rows) == len(SETTINGS) and len(objects["grids"]) == len(SETTINGS)
    assert metrics["ddim/3/3/clip_score"] == pytest.approx(next(
        r["clip_score"] for r in rows if (r["sampler"], r["steps"], r["guidance"]) == ("ddim", 3, 3.0)))


def test_prompt_accuracy_judges_the_single_object_prompts_of_the_test_split(report_run):
    from ldmkit.data.shapes import ShapesDataset

    _, _, objects = report_run
    truth = ShapesDataset("test", size=1000, resolution=32, seed=42, two_object_prob=0.3)
    single = sum(len(truth.attributes(i)["objects"]) == 1 for i in range(5))
    assert 0 < single < 5  # the first five held-out captions mix one- and two-object scenes
    for row in objects["rows"]:
        assert row["judged_prompts"] == single
        assert set(row["prompt_accuracy"]) == {"colour", "shape", "both"}
        assert all(0.0 <= v <= 1.0 for v in row["prompt_accuracy"].values())
        for key, (correct, judged) in row["prompt_accuracy_counts"].items():  # one object per judged prompt
            assert judged == single and correct / judged == row["prompt_accuracy"][key]
    assert f"judged on the {single} single-object prompts of 5" in "\n".join(objects["notes"])


def test_saved_pngs_carry_their_generation_parameters(report_run, tiny_artifacts):
    run, _, _ = report_run
    from ldmkit.data.shapes import ShapesDataModule

    dm = ShapesDataModule(batch_size=8, num_workers=0, resolution=32, seed=42)
    captions = next(iter(dm.dataloader("test")))["caption"][:5]
    folders = sorted((run / "images").iterdir())
    assert len(folders) == len(SETTINGS)
    for folder in folders:
        files = sorted(folder.glob("*.png"))
        assert [f.name for f in files] == [f"{i:05d}.png" for i in range(5)]
        for i, file in enumerate(files):
            params = read_png_parameters(file)
            assert params.prompt == captions[i] and params.negative_prompt == "blurry"
            assert params.seed == 100 + i  # base_seed + index, whatever the sampler
            assert f"{params.sampler}_{params.steps}steps_cfg{params.cfg_scale:g}" == folder.name
            assert params.size == (32, 32) and params.model_hash == weights_hash(tiny_artifacts["ldm"])


def test_txt2img_writes_pngs_with_parameters_and_a_step_progress_bar(tiny_artifacts, tmp_path, capfd):
    _, objects = run_eval([
        "task=txt2img", f"ckpt={tiny_artifacts['ldm']}", "prompt='a red circle, on the left'", "negative_prompt=blue",
        "sampler=euler_a", "steps=3", "guidance=7.5", "seed=353263948", "width=32", "height=32", "num_images=3",
        "batch_size=2", *TINY,
    ], tmp_path)
    files = sorted((tmp_path / "run").glob("*.png"))
    assert [f.name for f in files] == ["00000-353263948.png", "00001-353263949.png", "00002-353263950.png"]
    params = read_png_parameters(files[1])
    assert (params.prompt, params.negative_prompt, params.sampler, params.steps, params.cfg_scale, params.seed) == \
        ("a red circle, on the left", "blue", "euler_a", 3, 7.5, 353263949)
    assert params.size == (32, 32) and params.model_hash == weights_hash(tiny_artifacts["ldm"])
    assert "6/6" in capfd.readouterr().err  # 2 batches x 3 steps, advanced by the sampler callback
    # the same image eval's sampled sets draw for that prompt, seed and setting (batch-independent)
    from ldmkit.txt2img import load_text_to_image

    again = load_text_to_image(tiny_artifacts["ldm"]).generate(
        ["a red circle, on the left"], [353263949], negative_prompts=["blue"], sampler="euler_a", steps=3,
        guidance_scale=7.5)
    from PIL import Image

    saved = torch.from_numpy(np.array(Image.open(files[1]))).permute(2, 0, 1)
    expected = ((again[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    assert (saved.int() - expected.int()).abs().max() <= 1


# --- bad input: a clear error before anything is loaded or sampled --------------------------


@pytest.fixture
def no_sampling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the error must come before any model is loaded")

    monkeypatch.setattr("ldmkit.txt2img.load_text_to_image", refuse)


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    from ldmkit.eval import inception

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.delenv(inception.INCEPTION_WEIGHTS_ENV, raising=False)


def _bad_inputs(tiny_artifacts, tmp_path) -> dict:
    lightning_ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    lightning_ckpt.parent.mkdir(parents=True)
    torch.save({"state_dict": {}}, lightning_ckpt)
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n   \n")
    ldm = f"ckpt={tiny_artifacts['ldm']}"
    return {
        "autoencoder as ckpt": ([f"ckpt={tiny_artifacts['autoencoder']}"],
                                ["'autoencoder' artifact", "'ldm' artifact is needed", "python train.py model=ldm"]),
        "lightning ckpt": ([f"ckpt={lightning_ckpt}"], ["Lightning training checkpoint", "artifact"]),
        "no ckpt": ([], ["ckpt is not set"]),
        "missing inception": ([ldm, "metrics.fid=true"],
                              ["weights-inception-2015-12-05-6726825d.pth", "inception_path=", "metrics.fid=false"]),
        "missing explicit inception": ([ldm, "metrics.fid=true", f"inception_path={tmp_path}/none.pth"],
                                       [f"{tmp_path}/none.pth", "metrics.fid=false"]),
        "unknown sampler": ([ldm, "samplers=[ddim,dpm_fast]"],
                            ["'dpm_fast'", "ddpm, ddim, plms, dpmpp_2m, dpmpp_2m_sde, unipc, euler, euler_a, heun, lms"]),
        "steps < 1": ([ldm, "steps=[10,0]"], ["steps must be whole numbers >= 1", "0"]),
        "empty prompts file": ([ldm, f"prompts_file={empty}"], ["holds no prompts", str(empty)]),
        "num_samples < batch": ([ldm, "num_samples=3", "batch_size=8"],
                                ["num_samples=3 is smaller than batch_size=8", "batch_size=3"]),
        "more samples than held-out captions": ([ldm, "num_samples=30", "data.test_size=20"], ["only 20"]),
        # `sampler=` picks conf/sampler/<name>.yaml: Hydra itself refuses an unknown one and lists the options
        "txt2img unknown sampler": ([ldm, "task=txt2img", "prompt=x", "sampler=k_lms"], ["sampler/k_lms", "euler_a"]),
        "unknown sampler option": ([ldm, "samplers=[ddim,heun]", "+sampler_options.churn=0.5"],
                                   ["['churn']", "'eta'"]),
        "txt2img without prompt": ([ldm, "task=txt2img"], ["needs a prompt"]),
    }


BAD = ["autoencoder as ckpt", "lightning ckpt", "no ckpt", "missing inception", "missing explicit inception",
       "unknown sampler", "steps < 1", "empty prompts file", "num_samples < batch", "more samples than held-out captions",
       "txt2img unknown sampler", "unknown sampler option", "txt2img without prompt"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_fails_before_sampling_with_the_fix(case, tiny_artifacts, tmp_path, no_sampling, empty_hub):
    overrides, expected = _bad_inputs(tiny_artifacts, tmp_path)[case]
    fid_default = [] if any(o.startswith("metrics.fid") for o in overrides) else ["metrics.fid=false"]
    from hydra.errors import MissingConfigException

    with pytest.raises((EvalConfigError, MissingConfigException)) as info:
        run_eval([*overrides, *fid_default, *TINY], tmp_path)
    assert isinstance(info.value, MissingConfigException) == (case == "txt2img unknown sampler")
    for fragment in expected:
        assert fragment in str(info.value), f"{case}: {fragment!r} not in {info.value}"


# --- processes ------------------------------------------------------------------------------


@pytest.mark.slow  # ~2-3 min on a loaded 2-core machine: eval.py imports in 2 processes, 2 FIDs (2048-d eigvals)
def test_two_processes_give_the_metrics_of_one_with_fid_and_wandb(tiny_artifacts, tmp_path, inception_weights):
    """Same batches, same images, same metrics bit for bit (FID/KID from a test-written random Inception,
    CLIP score, prompt accuracy); rank 0 alone writes the report and logs the W&B table."""
    # one setting, stochastic (fresh noise each step: the harder case for identical images)
    common = [f"ckpt={tiny_artifacts['ldm']}", "samplers=[euler_a]", "steps=[2]", "guidance=[3]",
              "num_samples=6", "batch_size=2", "metrics.fid=true", f"inception_path={inception_weights}",
              "metrics.kid.subset_size=4", "metrics.kid.subsets=10", f"cache_dir={tmp_path / 'cache'}",
              "data.num_workers=0", "data.batch_size=8", "metrics.prompt_accuracy.judge_steps=5"]
    one, _ = run_eval([*common, "logger=none"], tmp_path / "one")
    references = list((tmp_path / "cache" / "fid").glob("ref-*.npz"))
    assert len(references) == 1  # cached reference statistics, reused by the second run

    run_dir = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "eval.py"), *common, "devices=2", "accelerator=cpu", "logger=wandb",
         f"hydra.run.dir={run_dir}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads((run_dir / "metrics.json").read_text())["rows"]
    assert "Starting with 2 processes" in result.stdout + result.stderr
    rows_one = json.loads((tmp_path / "one" / "run" / "metrics.json").read_text())["rows"]
    assert [comparable(r) for r in two] == [comparable(r) for r in rows_one]
    assert one["euler_a/2/3/fid"] == two[0]["fid"]
    for row in two:
        assert row["fid"] > 0 and row["kid_mean"] is not None and row["num_images"] == 6
    assert list((tmp_path / "cache" / "fid").glob("ref-*.npz")) == references
    tables = list(run_dir.glob("wandb/offline-run-*/files/media/table/**/*.table.json"))
    assert tables, "rank 0 logs the results table to the W&B run"
    assert len(list(run_dir.glob("wandb/offline-run-*"))) == 1  # only rank 0 logs



def test_non_wandb_loggers_get_the_scalar_metrics(tmp_path):
    from ldmkit.eval.loggers import log_to_loggers

    cfg = compose_eval(["logger=csv", "ckpt=/somewhere/run/artifact"], tmp_path)
    rows = [{"sampler": "ddim", "steps": 10, "guidance": 3.0, "nfe": 10, "fid": 12.5, "kid_mean": None,
             "clip_score": 25.0, "prompt_accuracy": {"colour": 0.5, "shape": 0.25, "both": 0.25}}]
    log_to_loggers(cfg, rows, {})
    text = (tmp_path / "run" / "csv" / "metrics.csv").read_text()
    header, values = text.splitlines()[:2]
    logged = dict(zip(header.split(","), values.split(",")))
    assert float(logged["ddim/10/3/fid"]) == 12.5 and float(logged["ddim/10/3/acc_shape"]) == 0.25
    assert "ddim/10/3/kid_mean" not in logged  # n/a is not logged as a number
