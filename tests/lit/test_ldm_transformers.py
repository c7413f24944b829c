"""The LDM stage with the transformer backbones (`backbone=dit`, `backbone=mmdit`) through the composed Hydra
config: a few training steps on tiny latents move the weights, the artifact records the arch, and the exported
artifact samples the same images as the trained module."""

from __future__ import annotations

import pytest
import torch

from ldmkit.generator import load_text_to_image
from ldmkit.pipeline import train

COMMON = [
    "model=ldm", "data.batch_size=4", "data.num_workers=0", "model.val_prompts=[a red circle,a blue square]",
    "sampler=ddim", "sampler.steps=2", "logger=csv", "callbacks=none", "trainer.accelerator=cpu",
    "trainer.limit_val_batches=1", "trainer.val_check_interval=3", "trainer.max_steps=3", "model.lr_warmup_steps=0",
]
SMALL = {  # a few blocks of width 64 over the 8x8x4 test latents
    "dit": ["backbone=dit", "+backbone.width=64", "+backbone.depth=2", "+backbone.num_heads=2", "+backbone.patch_size=2",
            "+backbone.qk_norm=true"],
    "mmdit": ["backbone=mmdit", "+backbone.width=64", "+backbone.depth=2", "+backbone.num_heads=2"],
}


@pytest.mark.parametrize("arch", ["dit", "mmdit"])
def test_ldm_trains_and_exports_with_a_transformer_backbone(compose_cfg, tiny_artifacts, arch):
    artifacts = [f"model.autoencoder={tiny_artifacts['autoencoder']}", f"model.text_encoder={tiny_artifacts['clip']}"]
    cfg = compose_cfg([*COMMON, *SMALL[arch], *artifacts])
    torch.manual_seed(0)
    metrics, objects = train(cfg)
    module = objects["model"]
    backbone = module.backbone
    assert backbone.arch == arch and backbone.config.width == 64 and backbone.config.depth == 2
    assert backbone.context_dim == module.frozen.context_dim and backbone.in_channels == module.frozen.latent_channels
    assert objects["trainer"].global_step == 3
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    # the zero-initialised output layer has left zero: the backbone learned something in 3 steps
    assert backbone.proj_out.weight.abs().max() > 0

    folder = objects["artifact"]
    kwargs = dict(sampler="ddim", steps=2, guidance_scale=3.0)
    expected = module.text_to_image().generate(["a red circle", "a blue square"], [3, 4], **kwargs)
    loaded = load_text_to_image(folder)
    assert loaded.backbone.arch == arch and loaded.backbone.config == module.ema.shadow.config
    torch.testing.assert_close(loaded.generate(["a red circle", "a blue square"], [3, 4], **kwargs), expected,
                               rtol=0, atol=1e-5)
