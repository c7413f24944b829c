"""Issue 16's bad input, each a one-paragraph error naming the problem and the fix before any weight loads: a patch
size that does not divide the latent size, a patch grid larger than the MMDiT's position table, a context width
that does not match the text encoder, an artifact whose backbone config is unknown. Training fails when the LDM
is built (before a step); loading an artifact fails on its config.json, before weights.safetensors is read."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import ldmkit.artifacts
from ldmkit.artifacts import ArtifactError
from ldmkit.generator import load_text_to_image
from ldmkit.ldm_checks import check_ldm_config, sample_size_problem
from ldmkit.nn.backbones import BackboneError
from ldmkit.pipeline import instantiate_node
from tests.artifacts import write_clip
from tests.lit.test_ldm import TINY, artifacts_overrides

TRANSFORMER = ["+backbone.width=64", "+backbone.depth=1", "+backbone.num_heads=2"]


def _ldm_cfg(compose_cfg, tiny_artifacts, *overrides):
    base = [o for o in TINY if "backbone" not in o]
    return compose_cfg([*base, *artifacts_overrides(tiny_artifacts), *overrides])


def test_training_refuses_a_patch_size_that_does_not_divide_the_latents(compose_cfg, tiny_artifacts):
    cfg = _ldm_cfg(compose_cfg, tiny_artifacts, "backbone=dit", *TRANSFORMER, "+backbone.patch_size=4", "data.resolution=24")
    with pytest.raises(BackboneError, match=r"multiples of 4, got 6x6\. Change the image resolution.*patch size"):
        instantiate_node(cfg.model)


def test_training_refuses_latents_larger_than_the_position_table(compose_cfg, tiny_artifacts):
    # tiny MMDiT: a 16x16 table at patch 1; 128 px images through the f4 autoencoder are 32x32 latents
    cfg = _ldm_cfg(compose_cfg, tiny_artifacts, "backbone=mmdit", *TRANSFORMER, "data.resolution=128")
    with pytest.raises(BackboneError, match=r"32x32 patch grid, larger than the mmdit backbone's 16x16 position table: "
                                            r"raise backbone.pos_embed_max_size"):
        instantiate_node(cfg.model)


@pytest.fixture
def copied_ldm(tiny_artifacts, tmp_path):
    folder = tmp_path / "ldm"
    shutil.copytree(tiny_artifacts["ldm"], folder)
    return folder


def _edit(folder, change):
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))
    return config


@pytest.fixture
def no_weight_reads(monkeypatch):
    """Fail the test if weights.safetensors is opened (the checks must come first)."""
    def refuse(*args, **kwargs):
        raise AssertionError("weights were read before the config was checked")

    monkeypatch.setattr(ldmkit.artifacts, "load_file", refuse)


def test_unknown_backbone_arch_or_field_is_refused_before_weights(copied_ldm, no_weight_reads):
    _edit(copied_ldm, lambda c: c["backbone"].update(arch="hdit"))
    with pytest.raises(ArtifactError, match=r"(?s)cannot build \(arch 'hdit'\): Unknown backbone arch 'hdit'; choose one "
                                            r"of unet.*upgrade ldmkit.*restore its 'backbone' entry.*No weights"):
        load_text_to_image(copied_ldm)
    _edit(copied_ldm, lambda c: c["backbone"].update(arch="unet") or c["backbone"]["config"].update(window_size=8))
    with pytest.raises(ArtifactError, match=r"no config field\(s\) \['window_size'\].*newer ldmkit"):
        load_text_to_image(copied_ldm)


def test_a_text_encoder_of_another_width_is_refused_before_weights(copied_ldm, tmp_path, no_weight_reads):
    wide = write_clip(tmp_path / "wide_clip")
    _edit(wide, lambda c: c.update(text_width=64))  # stands for a CLIP with 64-wide tokens (only config.json is read)
    config = _edit(copied_ldm, lambda c: c.update(text_encoder=str(wide)))
    with pytest.raises(ArtifactError, match=r"(?s)trained with a text token width of 32 \(its backbone's context_dim\), "
                                            r"but the text_encoder it references, '.*wide_clip', has 64.*Point it back at "
                                            rf"that text_encoder \(weights hash {config['encoders']['text_encoder']}\)"):
        load_text_to_image(copied_ldm)


def test_the_checks_pass_on_a_good_artifact_and_build_nothing_real(tiny_artifacts):
    config = json.loads((tiny_artifacts["ldm"] / "config.json").read_text())
    backbone = check_ldm_config(tiny_artifacts["ldm"], config)
    assert backbone.arch == "unet" and all(p.is_meta for p in backbone.parameters())


def test_sample_size_problems_name_the_sizes_that_work():
    from ldmkit.nn.backbones import build_backbone

    with torch.device("meta"):
        dit = build_backbone("dit", {"sample_size": 8, "patch_size": 2, "width": 64, "depth": 1, "num_heads": 2,
                                     "context_dim": 32})
        mmdit = build_backbone("mmdit", {"sample_size": 8, "patch_size": 1, "width": 64, "depth": 1, "num_heads": 2,
                                         "context_dim": 32, "pooled_dim": 32, "pos_embed_max_size": 16})
    assert sample_size_problem(dit, 4, 32, 64) is None
    assert "multiples of 8" in sample_size_problem(dit, 4, 36, 32)  # 9x8 latents at patch 2
    assert sample_size_problem(mmdit, 4, 64, 64) is None
    assert "of at most 64" in sample_size_problem(mmdit, 4, 128, 64)
