"""`eval.py ckpt=DIR/ldm` on an imported SD model: the sampler-comparison report runs through the real eval config
and holds one row per sampler, measured on the imported weights (SD 1.x eps and SD 2.x v-prediction)."""

from __future__ import annotations

import pytest

pytest.importorskip("diffusers")

from ldmkit.artifacts import weights_hash  # noqa: E402
from ldmkit.eval.errors import EvalConfigError  # noqa: E402
from ldmkit.interop.sd_import import import_checkpoint  # noqa: E402
from tests.eval.test_eval_cli import run_eval  # noqa: E402

# CLIP score off: an imported text encoder has no image tower (zeros), so it cannot score images; pass clip=<a CLIP>
FAST = ["logger=none", "data.num_workers=0", "data.batch_size=8", "metrics.fid=false", "metrics.kid=false",
        "metrics.prompt_accuracy=false", "metrics.clip_score=false", "num_samples=3", "batch_size=2"]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_eval_report_compares_samplers_on_an_imported_model(family: str, sd_folders, tmp_path) -> None:
    paths = import_checkpoint(sd_folders[family], tmp_path / "imported")
    metrics, _ = run_eval([f"ckpt={paths['ldm']}", "samplers=[ddim,dpmpp_2m]", "steps=[2]", "guidance=[3]", *FAST],
                          tmp_path / "eval")
    report = (tmp_path / "eval" / "run" / "report.md").read_text()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in report.splitlines()]
    rows = [r for r in cells if r[0] in ("ddim", "dpmpp_2m") and len(r) > 4]  # the metrics table (not the image grid's)
    assert sorted(r[:4] for r in rows) == [["ddim", "2", "3", "2"], ["dpmpp_2m", "2", "3", "2"]]  # sampler, steps, guidance, NFE
    assert all(metrics[f"{s}/2/3/num_images"] == 3 and metrics[f"{s}/2/3/sec_per_image"] > 0 for s in ("ddim", "dpmpp_2m"))
    # the imported weights were the ones sampled, at the imported model's resolution (8x8 latents x VAE factor 2)
    assert f"weights hash {weights_hash(paths['ldm'])}" in report and "samples 16x16" in report


def test_clip_score_refuses_the_imported_text_encoder_before_sampling(sd_folders, tmp_path, monkeypatch) -> None:
    """An imported text encoder's image tower is zeros: CLIP score with it would read 0.00 for every sample, so eval
    refuses it up front (as the LDM's own CLIP or as clip=), naming both ways out, and samples nothing."""
    paths = import_checkpoint(sd_folders["sd1"], tmp_path / "imported")
    monkeypatch.setattr("ldmkit.eval.sampled_sets.evaluate_models", lambda *a, **k: pytest.fail("sampled"))
    on = [o for o in FAST if o != "metrics.clip_score=false"] + ["metrics.clip_score=true"]
    for extra, what in [([], "the LDM's own text encoder"), ([f"clip={paths['text_encoder']}"], "the clip artifact")]:
        out = tmp_path / f"eval{len(extra)}"
        with pytest.raises(EvalConfigError) as info:
            run_eval([f"ckpt={paths['ldm']}", "samplers=[ddim]", "steps=[2]", "guidance=[3]", *on, *extra], out)
        message = str(info.value)
        assert f"{what} '{paths['text_encoder']}' has none" in message and "placeholder of zeros" in message
        assert "clip=PATH" in message and "metrics.clip_score=false" in message
        assert not list(out.rglob("report.md"))
