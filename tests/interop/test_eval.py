"""`eval.py ckpt=DIR/ldm` on an imported SD model: the sampler-comparison report runs through the real eval config
and holds one row per sampler, measured on the imported weights (SD 1.x eps and SD 2.x v-prediction)."""

from __future__ import annotations

import pytest

pytest.importorskip("diffusers")

from ldmkit.artifacts import weights_hash  # noqa: E402
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
