"""Nothing lost, clear errors (issue 13): a second eval or txt2img run in the same folder keeps the first
one's files, files are written atomically, and bad prompts files, seeds and output paths fail in the plan."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ldmkit.eval.plan import EvalConfigError
from ldmkit.eval.pngmeta import GenerationParameters, read_png_parameters, save_png_with_parameters
from tests.eval.test_eval_cli import TINY, compose_eval, run_eval

QUICK = ["samplers=[ddim]", "steps=[2]", "guidance=[3]", "num_samples=2", "batch_size=2", "metrics.fid=false",
         "metrics.clip_score=false", "grid_prompts=2"]


def test_a_second_sampled_sets_run_in_the_same_folder_keeps_the_first_report(tiny_artifacts, tmp_path):
    overrides = [f"ckpt={tiny_artifacts['ldm']}", *QUICK, "save_images=true", *TINY]
    run_eval(overrides, tmp_path)
    run = tmp_path / "run"
    first = {name: (run / name).read_bytes() for name in ("report.md", "report.html", "metrics.json")}
    first_png = (run / "images" / "ddim_2steps_cfg3" / "00000.png").read_bytes()
    _, objects = run_eval(overrides, tmp_path)
    assert {name: (run / name).read_bytes() for name in first} == first  # untouched
    assert (run / "images" / "ddim_2steps_cfg3" / "00000.png").read_bytes() == first_png
    assert objects["report"]["markdown"] == run / "report-2.md" and objects["report"]["metrics"] == run / "metrics-2.json"
    assert "report-2_assets/" in (run / "report-2.md").read_text()
    assert sorted(p.name for p in (run / "images-2" / "ddim_2steps_cfg3").iterdir()) == ["00000.png", "00001.png"]
    assert json.loads((run / "metrics-2.json").read_text())["rows"][0]["num_images"] == 2
    assert not list(run.glob(".*.tmp"))  # no temporary file left behind


def test_a_second_txt2img_run_in_the_same_folder_numbers_on(tiny_artifacts, tmp_path):
    overrides = ["task=txt2img", f"ckpt={tiny_artifacts['ldm']}", "prompt=a red circle", "sampler=ddim", "steps=2",
                 "seed=1", "num_images=1", *TINY]
    run_eval(overrides, tmp_path)
    first = (tmp_path / "run" / "00000-1.png").read_bytes()
    _, objects = run_eval([*overrides[:-len(TINY)], "guidance=1", *TINY], tmp_path)  # another image, same seed
    assert objects["images"] == [tmp_path / "run" / "00001-1.png"]
    assert (tmp_path / "run" / "00000-1.png").read_bytes() == first
    assert read_png_parameters(tmp_path / "run" / "00001-1.png").cfg_scale == 1.0


def test_a_png_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    from PIL import PngImagePlugin

    def crash(image, fp, filename, *args, **kwargs):
        fp.write(b"\x89PNG half a file")
        raise OSError("No space left on device")

    monkeypatch.setattr(PngImagePlugin, "_save", crash)
    monkeypatch.setitem(PngImagePlugin.Image.SAVE, "PNG", crash)
    with pytest.raises(OSError, match="No space"):
        save_png_with_parameters(np.zeros((4, 4, 3), np.uint8), tmp_path / "a.png", GenerationParameters(prompt="x"))
    assert list(tmp_path.iterdir()) == []


def test_an_existing_png_is_not_replaced_when_asked_not_to(tmp_path):
    path = save_png_with_parameters(np.zeros((4, 4, 3), np.uint8), tmp_path / "a.png", GenerationParameters(prompt="1", steps=2, sampler="ddim", seed=3))
    with pytest.raises(FileExistsError):
        save_png_with_parameters(np.ones((4, 4, 3), np.uint8), path, GenerationParameters(prompt="2", steps=2, sampler="ddim", seed=4), overwrite=False)
    assert read_png_parameters(path).prompt == "1" and [p.name for p in tmp_path.iterdir()] == ["a.png"]


# --- clear errors in the plan, before any model is loaded -----------------------------------


@pytest.fixture
def no_sampling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the error must come before any model is loaded")

    monkeypatch.setattr("ldmkit.txt2img.load_text_to_image", refuse)


def _plan_error(overrides: list[str], out: Path) -> str:
    with pytest.raises(EvalConfigError) as info:
        run_eval([*overrides, *TINY], out)
    return str(info.value)


def test_a_binary_prompts_file_is_refused_with_the_fix(tiny_artifacts, tmp_path, no_sampling):
    binary = tmp_path / "prompts.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    message = _plan_error([f"ckpt={tiny_artifacts['ldm']}", f"prompts_file={binary}", *QUICK], tmp_path)
    assert str(binary) in message and "not UTF-8 text" in message and "one prompt per line" in message


@pytest.mark.parametrize("task", ["txt2img", "sampled_sets"])
def test_a_seed_beyond_int64_fails_in_the_plan(tiny_artifacts, tmp_path, no_sampling, task):
    key = "seed" if task == "txt2img" else "base_seed"
    extra = ["prompt=x"] if task == "txt2img" else QUICK
    message = _plan_error([f"task={task}", f"ckpt={tiny_artifacts['ldm']}", f"{key}={2**63}", *extra], tmp_path)
    assert f"{key}={2**63}" in message and "[0, 2**63 - 1]" in message and f"{key}=<0 .. " in message
    # the last image's seed counts too: seed + num_images - 1 must fit
    extra = ["prompt=x", "num_images=2"] if task == "txt2img" else QUICK
    message = _plan_error([f"task={task}", f"ckpt={tiny_artifacts['ldm']}", f"{key}={2**63 - 1}", *extra], tmp_path)
    assert f"{key}=<0 .. {2**63 - 2}>" in message


@pytest.mark.parametrize("task", ["txt2img", "sampled_sets"])
def test_an_output_path_that_is_a_file_fails_in_the_plan(tiny_artifacts, tmp_path, no_sampling, task):
    (tmp_path / "run").write_text("a user's file")
    extra = ["prompt=x"] if task == "txt2img" else QUICK
    message = _plan_error([f"task={task}", f"ckpt={tiny_artifacts['ldm']}", *extra], tmp_path)
    assert f"'{tmp_path / 'run'}' is a file" in message and "hydra.run.dir" in message
    assert (tmp_path / "run").read_text() == "a user's file"


def test_metric_switches_and_unknown_metrics(tiny_artifacts, tmp_path, no_sampling):
    from ldmkit.eval.plan import plan_sampled_sets

    plan = plan_sampled_sets(compose_eval([f"ckpt={tiny_artifacts['ldm']}", *QUICK, "metrics.clip_score=true",
                                           *TINY], tmp_path))
    assert [(slot.name, slot.on) for slot in plan.metrics] == [
        ("fid", False), ("kid", False), ("clip_score", True), ("prompt_accuracy", True)]
    message = _plan_error([f"ckpt={tiny_artifacts['ldm']}", *QUICK, "+metrics.fd_nothing=true"], tmp_path)
    assert "'fd_nothing'" in message and "known: clip_score, cmmd, compositional, fd_dinov2, fid, kid, prdc, prompt_accuracy" in message
