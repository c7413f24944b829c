"""An imported tiny SD model fine-tunes through the real training pipeline (`model.init=DIR/ldm`), and the result
exports to a folder StableDiffusionPipeline loads."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from ldmkit.artifacts import ArtifactError, load_artifact  # noqa: E402
from ldmkit.interop.sd_export import export_diffusers  # noqa: E402
from ldmkit.interop.sd_import import import_checkpoint  # noqa: E402
from ldmkit.pipeline import train  # noqa: E402


def _overrides(paths, *extra: str) -> list[str]:
    return ["model=ldm", f"model.init={paths['ldm']}", f"model.autoencoder={paths['autoencoder']}",
            f"model.text_encoder={paths['text_encoder']}", "model.use_pooled=false", "process=scaled_linear",
            "data.resolution=16", "data.batch_size=4", "data.num_workers=0", "model.val_prompts=[a red circle]",
            "sampler=ddim", "sampler.steps=2", "logger=csv", "callbacks=none", "trainer.accelerator=cpu",
            "trainer.limit_val_batches=1", "trainer.max_steps=3", "trainer.val_check_interval=3", *extra]


@pytest.mark.slow
def test_imported_model_fine_tunes_and_exports(sd_folders, compose_cfg, tmp_path) -> None:
    paths = import_checkpoint(sd_folders["sd1"], tmp_path / "imported")
    with pytest.raises(ArtifactError, match="model.loss.prediction=eps"):
        train(compose_cfg(_overrides(paths, "model.loss.prediction=v")))
    metrics, objects = train(compose_cfg(_overrides(paths, "model.loss.prediction=eps", "model.lr_warmup_steps=0")))
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    init, _ = load_artifact(paths["ldm"], "ldm")
    tuned = {f"backbone.{k}": v for k, v in objects["model"].backbone.state_dict().items()}
    moved = max((tuned[k] - init[k]).abs().max() for k in tuned)
    assert 0 < moved < 0.05  # trained, starting from the imported weights (3 Adam steps at lr 2e-4)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(export_diffusers(objects["artifact"], tmp_path / "out"), local_files_only=True)
    assert pipe.scheduler.config.prediction_type == "epsilon" and pipe.unet.config.cross_attention_dim == 64
