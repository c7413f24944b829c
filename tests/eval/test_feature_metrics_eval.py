"""fd_dinov2, cmmd and prdc through `eval.py`'s real config (conf/metrics/), on tiny random artifacts and a
tiny random DINOv2 written to tmp_path: the reported numbers equal the library functions applied to the
saved PNGs and the cached real-image features; bad input fails before sampling."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ldmkit.eval.distribution import cmmd, density_coverage, frechet_feature_distance, precision_recall
from ldmkit.eval.features.clip import CLIPImageFeatureExtractor
from ldmkit.eval.features.common import FeatureSet
from ldmkit.eval.features.dinov2 import DINOV2_ENV, DINOv2FeatureExtractor
from ldmkit.eval.reference_stats import read_image_uint8
from ldmkit.eval.plan import EvalConfigError
from tests.eval.test_eval_cli import TINY, run_eval

METRICS = "metrics=[clip_score,fd_dinov2,cmmd,prdc]"


@pytest.fixture(scope="module")
def dinov2_folder(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=14,
                                     image_size=518, layerscale_value=0.5))
    folder = tmp_path_factory.mktemp("dinov2")
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def feature_run(tiny_artifacts, dinov2_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("feature_run")
    metrics, objects = run_eval([
        f"ckpt={tiny_artifacts['ldm']}", "samplers=[ddim]", "steps=[2]", "guidance=[3]", "num_samples=6",
        "batch_size=4", METRICS, f"metrics.fd_dinov2.weights={dinov2_folder}", f"metrics.prdc.weights={dinov2_folder}",
        "save_images=true", *TINY[:3],
    ], out)
    return out, metrics, objects


def test_reported_numbers_equal_the_library_on_saved_pngs(feature_run, tiny_artifacts, dinov2_folder):
    out, metrics, _ = feature_run
    run = out / "run"
    (row,) = json.loads((run / "metrics.json").read_text())["rows"]
    pngs = sorted((run / "images").glob("*/*.png"))
    images = torch.stack([read_image_uint8(p) for p in pngs])  # (6, 3, 32, 32)
    cache = sorted((out / "cache" / "features").glob("ref-*.safetensors"))
    assert len(pngs) == 6 and len(cache) == 2  # one DINOv2 reference shared by fd_dinov2 and prdc, one CLIP
    dino, clip = DINOv2FeatureExtractor(dinov2_folder), CLIPImageFeatureExtractor(tiny_artifacts["clip"])
    refs = {json.dumps(FeatureSet.load(p).identity, sort_keys=True): FeatureSet.load(p) for p in cache}
    generated = {}
    for extractor in (dino, clip):
        generated[extractor] = FeatureSet.of(extractor)
        generated[extractor].update(images)
    real_dino = refs[json.dumps(dino.identity, sort_keys=True)]
    real_clip = refs[json.dumps(clip.identity, sort_keys=True)]
    assert real_dino.num_samples == 6 and real_dino.image_size == (32, 32)
    assert row["fd_dinov2"] == pytest.approx(frechet_feature_distance(real_dino, generated[dino]), rel=1e-5)
    assert row["cmmd"] == pytest.approx(cmmd(real_clip, generated[clip]), rel=1e-4)
    expected = {**precision_recall(real_dino, generated[dino], 3), **density_coverage(real_dino, generated[dino], 5)}
    for key, value in expected.items():
        assert row[key] == pytest.approx(value, abs=1e-9)
    assert metrics["ddim/2/3/fd_dinov2"] == pytest.approx(row["fd_dinov2"]) and row["fd_dinov2"] > 0


def test_report_shows_columns_and_preprocessing(feature_run):
    out, _, _ = feature_run
    markdown = (out / "run" / "report.md").read_text()
    for header in ("FD-DINOv2", "CMMD", "Precision", "Recall", "Density", "Coverage"):
        assert header in markdown
    assert "224x224 bicubic, antialiased, as PIL" in markdown and "dgm-eval" in markdown
    assert "largest centred square" in markdown and "sigma 10" in markdown
    # which DINOv2 weights: a hub snapshot folder here, recorded as not checked against a published digest
    assert "facebook/dinov2-large snapshot folder" in markdown and "no published digest" in markdown


@pytest.fixture
def no_sampling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the error must come before any model is loaded")

    monkeypatch.setattr("ldmkit.txt2img.load_text_to_image", refuse)


def test_bad_input_fails_before_sampling(tiny_artifacts, dinov2_folder, tmp_path, monkeypatch, no_sampling):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.delenv(DINOV2_ENV, raising=False)
    base = [f"ckpt={tiny_artifacts['ldm']}", "samplers=[ddim]", "steps=[2]", *TINY[:3]]
    cases = {
        "missing weights": (["metrics=[fd_dinov2]", "num_samples=4", "batch_size=2"],
                            ["dinov2_vitl14_pretrain.pth", "metrics.fd_dinov2.weights=PATH", "metrics.fd_dinov2=false"]),
        "k >= n": (["metrics=[prdc]", f"metrics.prdc.weights={dinov2_folder}", "num_samples=5", "batch_size=1"],
                   ["prdc needs at least 6 images per set, num_samples=5"]),
        "other resolution": (["metrics=[cmmd]", "num_samples=4", "batch_size=2", "height=64", "width=64"],
                             ["samples are 64x64 but the real images are 32x32"]),
        "unknown features": (["metrics=[prdc]", "metrics.prdc.features=inception", "num_samples=8", "batch_size=4"],
                             ["metrics.prdc.features='inception'", "dinov2, clip"]),
    }
    for case, (overrides, fragments) in cases.items():
        with pytest.raises(EvalConfigError) as info:
            run_eval([*base, *overrides], tmp_path / case.replace(" ", "_"))
        for fragment in fragments:
            assert fragment in str(info.value), f"{case}: {fragment!r} not in {info.value}"
