"""`eval.py` on a rectified-flow artifact: the flow samplers compared in one report with NFE and time, and a
VP-only sampler refused before anything is sampled."""

from __future__ import annotations

import pytest

from ldmkit.diffusion.flow import RectifiedFlow
from ldmkit.eval.plan import EvalConfigError
from tests.artifacts import write_ldm
from tests.eval.test_eval_cli import run_eval

FAST = ["logger=none", "data.num_workers=0", "data.batch_size=8", "metrics.fid=false", "metrics.kid=false",
        "metrics.prompt_accuracy=false", "num_samples=4", "batch_size=2"]


@pytest.fixture(scope="module")
def flow_artifact(tiny_artifacts, tmp_path_factory):
    return write_ldm(tmp_path_factory.mktemp("flow") / "ldm", tiny_artifacts["autoencoder"], tiny_artifacts["clip"],
                     prediction="flow", process=RectifiedFlow(shift=3.0),
                     sampler={"name": "euler", "steps": 3, "guidance_scale": 2.0})


def test_eval_compares_samplers_on_a_flow_model(flow_artifact, tmp_path):
    metrics, _ = run_eval([f"ckpt={flow_artifact}", "samplers=[euler,heun,dpmpp_2m,unipc]", "steps=[3]",
                           "guidance=[3]", *FAST], tmp_path)
    assert {name: metrics[f"{name}/3/3/nfe"] for name in ("euler", "heun", "dpmpp_2m", "unipc")} == {
        "euler": 3, "heun": 5, "dpmpp_2m": 3, "unipc": 3}  # flow Heun corrects out of pure noise too: 2·3 - 1
    assert all(metrics[f"{name}/3/3/sec_per_image"] > 0 for name in ("euler", "heun"))
    assert metrics["euler/3/3/clip_score"] == metrics["euler/3/3/clip_score"]  # scored (not NaN)
    report = (tmp_path / "run" / "report.md").read_text()
    assert "heun" in report and "unipc" in report


def test_vp_only_sampler_is_refused_before_sampling(flow_artifact, tmp_path):
    with pytest.raises(EvalConfigError, match="ddim.*variance-preserving.*rectified_flow"):
        run_eval([f"ckpt={flow_artifact}", "samplers=[euler,ddim]", "steps=[3]", "guidance=[3]", *FAST], tmp_path)
