"""The LDM stage through the real configs and pipeline: every parameterisation trains, resume keeps
the step and the EMA, export → load reproduces samples, and bad artifacts fail before heavy work."""

from __future__ import annotations

import pytest
import torch

from ldmkit.artifacts import ArtifactError
from ldmkit.pipeline import instantiate_node, train
from ldmkit.generator import load_text_to_image
from tests.artifacts import write_autoencoder, write_clip

TINY = [
    "model=ldm", "backbone=unet", "backbone.preset=tiny", "+backbone.model_channels=32", "+backbone.channel_mult=[1,2]",
    "+backbone.num_res_blocks=1", "+backbone.attention_levels=[1]", "+backbone.num_heads=null",
    "+backbone.head_dim=16", "+backbone.norm_groups=8", "data.batch_size=4", "data.num_workers=0",
    "model.val_prompts=[a red circle,a blue square]", "sampler=ddim", "sampler.steps=2",
    "logger=csv", "callbacks=none", "trainer.accelerator=cpu", "trainer.limit_val_batches=1",
]


def artifacts_overrides(tiny_artifacts) -> list[str]:
    return [f"model.autoencoder={tiny_artifacts['autoencoder']}", f"model.text_encoder={tiny_artifacts['clip']}"]


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_fast_dev_run_each_parameterisation(compose_cfg, tiny_artifacts, prediction):
    cfg = compose_cfg([*TINY, *artifacts_overrides(tiny_artifacts), f"model.loss.prediction={prediction}", "debug=fast_dev_run"])
    metrics, objects = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert objects["model"].loss_fn.prediction == prediction


def test_resume_continues_step_with_ema_intact(compose_cfg, tiny_artifacts, tmp_path):
    common = [*TINY, *artifacts_overrides(tiny_artifacts), "trainer.val_check_interval=4", "export=false",
              "callbacks=model_checkpoint", "callbacks.model_checkpoint.every_n_train_steps=4", "model.ema_decay=0.9"]
    cfg = compose_cfg([*common, "trainer.max_steps=4"])
    _, first = train(cfg)
    ema_at_4 = [p.clone() for p in first["model"].ema.shadow.parameters()]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert last.is_file()
    cfg = compose_cfg([*common, "trainer.max_steps=6", f"ckpt_path={last}"])
    _, second = train(cfg)
    model = second["model"]
    assert second["trainer"].global_step == 6
    # the EMA restored from the checkpoint has moved on from step 4's values, not restarted from the live weights
    assert int(model.ema.num_updates) == 6
    moved = [(a - b).abs().max() for a, b in zip(ema_at_4, model.ema.shadow.parameters())]
    assert max(moved) > 0
    checkpoint = torch.load(last, weights_only=True)
    assert not any(k.startswith(("autoencoder.", "text_encoder.")) for k in checkpoint["state_dict"])


def test_export_load_round_trip_gives_identical_samples(tiny_artifacts):
    from tests.artifacts import ldm_module

    module = ldm_module(tiny_artifacts["autoencoder"], tiny_artifacts["clip"])
    with torch.no_grad():
        for p in module.ema.shadow.parameters():
            p.add_(0.01 * torch.randn_like(p))
    before = module.text_to_image().generate(["a red circle", "a green star"], [3, 4], sampler="dpmpp_2m", steps=4, guidance_scale=3.0)
    folder = module.export_artifact(tiny_artifacts["ldm"].parent / "roundtrip")
    after = load_text_to_image(folder).generate(["a red circle", "a green star"], [3, 4], sampler="dpmpp_2m", steps=4, guidance_scale=3.0)
    assert torch.equal(before, after)


def test_same_seed_same_image_whatever_the_batch(tiny_artifacts):
    t2i = load_text_to_image(tiny_artifacts["ldm"])
    pair = t2i.generate(["a red circle", "a blue square"], [11, 12], sampler="ddim", steps=3)
    alone = t2i.generate(["a blue square"], [12], sampler="ddim", steps=3)
    torch.testing.assert_close(pair[1:], alone, atol=1e-5, rtol=0)


def test_missing_autoencoder_names_the_command(compose_cfg, tiny_artifacts, tmp_path):
    cfg = compose_cfg([*TINY, f"model.autoencoder={tmp_path / 'nope'}", f"model.text_encoder={tiny_artifacts['clip']}"])
    with pytest.raises(ArtifactError, match="python train.py model=autoencoder"):
        instantiate_node(cfg.model)
    cfg = compose_cfg([*TINY, f"model.text_encoder={tiny_artifacts['clip']}"])
    with pytest.raises(ArtifactError, match="model.autoencoder=PATH"):
        instantiate_node(cfg.model)


def test_wrong_kind_of_artifact_is_rejected(compose_cfg, tiny_artifacts):
    cfg = compose_cfg([*TINY, f"model.autoencoder={tiny_artifacts['clip']}", f"model.text_encoder={tiny_artifacts['clip']}"])
    with pytest.raises(ArtifactError, match="'clip' artifact, but a 'autoencoder' artifact is needed"):
        instantiate_node(cfg.model)
    cfg = compose_cfg([*TINY, f"model.autoencoder={tiny_artifacts['autoencoder']}", f"model.text_encoder={tiny_artifacts['autoencoder']}"])
    with pytest.raises(ArtifactError, match="python train.py model=clip"):
        instantiate_node(cfg.model)


def test_mismatched_context_width_fails_before_training(compose_cfg, tiny_artifacts):
    cfg = compose_cfg([*TINY, *artifacts_overrides(tiny_artifacts), "+backbone.context_dim=768"])
    with pytest.raises(ArtifactError, match="context_dim=768 but the text encoder .* gives 32"):
        instantiate_node(cfg.model)


def test_frozen_bf16_runs_the_encoders_in_bf16_and_hands_the_unet_float32(tiny_artifacts):
    from tests.artifacts import ldm_module

    fp32 = ldm_module(tiny_artifacts["autoencoder"], tiny_artifacts["clip"])
    bf16 = ldm_module(tiny_artifacts["autoencoder"], tiny_artifacts["clip"], frozen_bf16=True)
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    batch = {"image": images, "caption": ["a red circle", "a blue square", "a green star", ""]}
    outputs = {}
    for name, module in (("fp32", fp32), ("bf16", bf16)):
        torch.manual_seed(0)
        z = module.latents(batch)
        context, pooled = module.conditioning(batch, drop_prob=0.0)
        outputs[name] = (z, context, pooled)
        assert all(t.dtype == torch.float32 for t in outputs[name])
        loss = module.objective(module.net, z, (context, pooled))  # the fp32 backbone accepts them
        assert torch.isfinite(loss).all()
    for reference, approx in zip(outputs["fp32"], outputs["bf16"]):
        assert not torch.equal(reference, approx)  # bf16 really ran
        assert torch.allclose(reference, approx, rtol=0.05, atol=0.05 * reference.abs().max().item())


def test_rectified_flow_trains_validates_exports_and_round_trips(compose_cfg, tiny_artifacts):
    # SD3-style through the composed config: flow prediction, static shift, logit-normal t, cosmap weighting
    import json
    from pathlib import Path

    from ldmkit.diffusion.flow import RectifiedFlow

    flow = ["process=rectified_flow", "process.shift=3.0", "model.loss.prediction=flow",
            "model.loss.timestep_sampling=logit_normal", "model.loss.weighting=cosmap", "sampler=euler",
            "trainer.max_steps=3", "trainer.val_check_interval=3"]
    cfg = compose_cfg([*TINY, *artifacts_overrides(tiny_artifacts), *flow])
    metrics, objects = train(cfg)
    module = objects["model"]
    assert isinstance(module.process, RectifiedFlow) and module.process.shift == 3.0
    assert torch.isfinite(torch.tensor(metrics["train/loss"])) and torch.isfinite(torch.tensor(metrics["val/x0_mse"]))
    folder = Path(cfg.paths.output_dir) / "artifact"
    process = json.loads((folder / "config.json").read_text())["process"]
    assert process["kind"] == "rectified_flow" and process["shift"] == 3.0 and process["prediction"] == "flow"
    t2i = load_text_to_image(folder)
    assert t2i.process == module.process and t2i.prediction == "flow"
    prompts, seeds = ["a red circle", "a blue square"], [3, 4]
    before = module.text_to_image().generate(prompts, seeds, sampler="heun", steps=3, guidance_scale=3.0)
    after = t2i.generate(prompts, seeds, sampler="heun", steps=3, guidance_scale=3.0)
    assert torch.isfinite(after).all() and torch.equal(before, after)


def test_vp_schedule_with_flow_prediction_fails_with_the_reason(compose_cfg, tiny_artifacts):
    cfg = compose_cfg([*TINY, *artifacts_overrides(tiny_artifacts), "model.loss.prediction=flow"])
    with pytest.raises(Exception, match="process=rectified_flow with prediction=flow"):
        instantiate_node(cfg.model)
    # a VP-only validation sampler on the flow process fails before training, not at the first validation
    cfg = compose_cfg([*TINY, *artifacts_overrides(tiny_artifacts), "process=rectified_flow", "model.loss.prediction=flow"])
    with pytest.raises(Exception, match="ddim sampler is defined for variance-preserving.*euler"):
        instantiate_node(cfg.model)


@pytest.mark.parametrize("mode", ["pooled", "tokens+pooled"])
def test_text_context_trains_exports_and_generates_the_same(compose_cfg, tiny_artifacts, mode):
    # the backbone attends to the pooled embedding (as its one token, or after the token states); the artifact
    # records it, so the reloaded generator conditions the same way
    import json
    from pathlib import Path

    cfg = compose_cfg([*TINY, *artifacts_overrides(tiny_artifacts), f"model.text_context={mode}",
                       "trainer.max_steps=2", "trainer.val_check_interval=2"])
    metrics, objects = train(cfg)
    module = objects["model"]
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    seen = {}
    handle = module.backbone.register_forward_pre_hook(lambda m, a, kw: seen.update(context=kw["context"]), with_kwargs=True)
    x = torch.randn(2, module.latent_channels, module.latent.height, module.latent.width)
    tokens, pooled = module.encode_text(["a red circle", "a blue square"])
    module.net(x, torch.tensor([10.0, 500.0]), (tokens, pooled))
    handle.remove()
    expected = pooled[:, None] if mode == "pooled" else torch.cat([tokens, pooled[:, None]], dim=1)
    assert torch.equal(seen["context"], expected)
    folder = Path(cfg.paths.output_dir) / "artifact"
    assert json.loads((folder / "config.json").read_text())["text_encoder_options"]["context"] == mode
    prompts, seeds = ["a red circle", "a blue square"], [3, 4]
    before = module.text_to_image().generate(prompts, seeds, sampler="ddim", steps=3, guidance_scale=3.0)
    after = load_text_to_image(folder).generate(prompts, seeds, sampler="ddim", steps=3, guidance_scale=3.0)
    assert torch.equal(before, after)


def test_unknown_text_context_is_refused_with_the_choices(compose_cfg, tiny_artifacts):
    cfg = compose_cfg([*TINY, *artifacts_overrides(tiny_artifacts), "model.text_context=eos"])
    with pytest.raises(ValueError, match="text_context='eos' is not one of tokens, pooled, tokens\\+pooled"):
        instantiate_node(cfg.model)
