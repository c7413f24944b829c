"""The generator and the ldm artifact schema: v1 artifacts load and sample as v2 ones, missing keys and
unknown architectures fail with the fix, validation samples exactly what eval draws with the same sampler
config, `use_pooled=false` trains, validates, exports and samples, and resume refuses other encoders."""

from __future__ import annotations

import json

import pytest
import torch

from ldmkit.artifacts import ArtifactError, load_artifact, read_ldm_artifact
from ldmkit.generator import load_text_to_image, sampler_kwargs
from tests.artifacts import ldm_module, write_autoencoder, write_ldm_v1

PROMPTS, SEEDS = ["a red circle", "a green star"], [3, 4]


def _perturbed(tiny_artifacts, **kwargs):
    torch.manual_seed(0)
    module = ldm_module(tiny_artifacts["autoencoder"], tiny_artifacts["clip"], **kwargs)
    with torch.no_grad():
        for p in module.ema.shadow.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return module


def test_v1_artifact_loads_and_samples_like_v2(tiny_artifacts, tmp_path):
    module = _perturbed(tiny_artifacts, prediction="v")
    v1 = write_ldm_v1(tmp_path / "v1", module)
    v2 = module.export_artifact(tmp_path / "v2")
    assert json.loads((v1 / "config.json").read_text())["format_version"] == 1
    config = json.loads((v2 / "config.json").read_text())
    assert config["format_version"] == 2 and config["backbone"]["arch"] == "unet"
    assert config["process"]["kind"] == "vp_discrete" and config["process"]["prediction"] == "v"
    assert config["process"]["schedule"]["name"] == "scaled_linear"
    assert set(config["encoders"]) == {"autoencoder", "text_encoder"}
    old, new = load_text_to_image(v1), load_text_to_image(v2)
    assert old.prediction == new.prediction == "v"
    assert torch.equal(old.process.alphas_cumprod, new.process.alphas_cumprod)
    for sampler in ("dpmpp_2m", "euler_a"):
        a = old.generate(PROMPTS, SEEDS, sampler=sampler, steps=3, guidance_scale=3.0, guidance_rescale=0.5)
        b = new.generate(PROMPTS, SEEDS, sampler=sampler, steps=3, guidance_scale=3.0, guidance_rescale=0.5)
        assert torch.equal(a, b)
    live = module.text_to_image().generate(PROMPTS, SEEDS, sampler="dpmpp_2m", steps=3, guidance_scale=3.0, guidance_rescale=0.5)
    assert torch.equal(live, new.generate(PROMPTS, SEEDS, sampler="dpmpp_2m", steps=3, guidance_scale=3.0, guidance_rescale=0.5))


@pytest.mark.parametrize("version", [1, 2])
def test_config_without_a_needed_key_names_key_file_and_fix(tiny_artifacts, tmp_path, version):
    module = _perturbed(tiny_artifacts)
    folder = write_ldm_v1(tmp_path / "a", module) if version == 1 else module.export_artifact(tmp_path / "a")
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    del config["autoencoder"]
    config_file.write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match=r"(?s)config.json' has no 'autoencoder'.*python train.py model=ldm"):
        load_text_to_image(folder)


def test_unknown_backbone_arch_says_so_before_loading_weights(tiny_artifacts, tmp_path):
    folder = _perturbed(tiny_artifacts).export_artifact(tmp_path / "a")
    config = json.loads((folder / "config.json").read_text())
    config["backbone"]["arch"] = "hdit"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="Unknown backbone arch 'hdit'; choose one of unet"):
        load_text_to_image(folder)
    tensors, config = load_artifact(folder, "ldm")
    assert read_ldm_artifact(folder, config, tensors).backbone["arch"] == "hdit"  # the reader itself is arch-agnostic


def test_validation_samples_what_eval_draws_with_the_whole_sampler_config(tiny_artifacts, tmp_path):
    sampler = {"name": "ddim", "steps": 3, "guidance_scale": 2.0, "guidance_rescale": 0.3, "spacing": "leading", "eta": 0.5}
    module = _perturbed(tiny_artifacts, sampler=sampler, val_prompts=PROMPTS, val_seed=3)
    validation = module.sample_validation_grid()
    t2i = load_text_to_image(module.export_artifact(tmp_path / "a"))
    # what eval.py passes for this sampler config (runner.check_sampler_options: spacing, and eta of the named sampler)
    evaluated = t2i.generate(PROMPTS, SEEDS, sampler="ddim", steps=3, guidance_scale=2.0, guidance_rescale=0.3,
                             spacing="leading", eta=0.5)
    assert torch.equal(validation, evaluated)
    trailing = t2i.generate(PROMPTS, SEEDS, sampler="ddim", steps=3, guidance_scale=2.0, guidance_rescale=0.3, eta=0.5)
    assert not torch.equal(validation, trailing)  # spacing reached the sampler
    assert sampler_kwargs({**sampler, "rho": None}) == {"sampler": "ddim", "steps": 3, "guidance_scale": 2.0,
                                                         "guidance_rescale": 0.3, "spacing": "leading", "eta": 0.5}


def test_zero_snr_eps_model_validates_with_leading_spacing(tiny_artifacts):
    from ldmkit.diffusion.objectives import DenoisingObjective
    from ldmkit.diffusion.vp import make_schedule

    module = _perturbed(tiny_artifacts, sampler={"name": "dpmpp_2m", "steps": 3, "guidance_scale": 2.0, "spacing": "leading"})
    module.objective = DenoisingObjective(make_schedule("scaled_linear", zero_terminal_snr=True), prediction="eps")
    module.process = module.objective.process
    assert torch.isfinite(module.sample_validation_grid()).all()  # the fix the sampler's own error suggests works


def test_use_pooled_false_trains_validates_exports_and_samples(compose_cfg, tiny_artifacts, tmp_path):
    from ldmkit.pipeline import train
    from tests.lit.test_ldm import TINY, artifacts_overrides

    cfg = compose_cfg([*TINY, *artifacts_overrides(tiny_artifacts), "model.use_pooled=false", "debug=fast_dev_run"])
    _, objects = train(cfg)  # fast_dev_run validates once and draws the validation grid at its end
    module = objects["model"]
    assert module.backbone.pooled_dim is None and module.backbone.pooled_proj is None
    t2i = load_text_to_image(module.export_artifact(tmp_path / "a"))
    images = t2i.generate(PROMPTS, SEEDS, sampler="euler", steps=2, guidance_scale=2.0)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()


def test_resume_refuses_other_frozen_encoders(tiny_artifacts, tmp_path):
    module = ldm_module(tiny_artifacts["autoencoder"], tiny_artifacts["clip"])
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert not any(k.startswith(("autoencoder.", "text_encoder.")) for k in checkpoint["state_dict"])
    same = ldm_module(tiny_artifacts["autoencoder"], tiny_artifacts["clip"])
    same.on_load_checkpoint({**checkpoint, "state_dict": dict(checkpoint["state_dict"])})  # accepted
    other_ae = write_autoencoder(tmp_path / "other_ae", seed=1)
    other = ldm_module(other_ae, tiny_artifacts["clip"])
    with pytest.raises(ArtifactError, match=r"(?s)trained with another autoencoder.*Set model.autoencoder="):
        other.on_load_checkpoint({**checkpoint, "state_dict": dict(checkpoint["state_dict"])})


def test_checkpoints_from_before_the_backbone_registry_resume(tiny_artifacts):
    module = _perturbed(tiny_artifacts)
    old_style = {"state_dict": {("unet." + k[len("backbone."):] if k.startswith("backbone.") else k): v
                                for k, v in module.state_dict().items()}}
    fresh = ldm_module(tiny_artifacts["autoencoder"], tiny_artifacts["clip"])
    fresh.on_load_checkpoint(old_style)
    fresh.load_state_dict(old_style["state_dict"])
    assert all(torch.equal(a, b) for a, b in zip(module.backbone.parameters(), fresh.backbone.parameters()))
