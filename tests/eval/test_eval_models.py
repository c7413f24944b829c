"""Several models in one `eval.py` run (`ckpt={vp: A, flow: B}` or `ckpt=[A,B]`): a VP and a rectified-flow model's
samplers side by side in one report with NFE and time, rows labelled by model, the same images as each model's own
run, VP-only samplers skipped for the flow model (said in the notes), and the planning errors."""

from __future__ import annotations

import json

import pytest
import torch

from ldmkit.diffusion.flow import RectifiedFlow
from ldmkit.eval.models import named_ckpts, run_folder_label
from ldmkit.eval.plan import EvalConfigError, plan_sampled_sets
from tests.artifacts import write_ldm
from tests.eval.test_eval_cli import compose_eval, run_eval
from tests.eval.test_eval_flow import FAST


@pytest.fixture(scope="module")
def flow_artifact(tiny_artifacts, tmp_path_factory):
    return write_ldm(tmp_path_factory.mktemp("flow_run") / "artifact", tiny_artifacts["autoencoder"],
                     tiny_artifacts["clip"], prediction="flow", process=RectifiedFlow(shift=3.0),
                     sampler={"name": "euler", "steps": 3, "guidance_scale": 2.0})


@pytest.fixture(scope="module")
def two_model_run(tiny_artifacts, flow_artifact, tmp_path_factory):
    out = tmp_path_factory.mktemp("models")
    metrics, objects = run_eval([f"ckpt={{vp:{tiny_artifacts['ldm']},flow:{flow_artifact}}}",
                                 "samplers=[euler,ddim,heun]", "steps=[3]", "guidance=[3]", "grid_prompts=2", *FAST], out)
    return out / "run", metrics, objects


def test_one_report_compares_a_vp_and_a_flow_model_with_nfe_and_time(two_model_run):
    run, metrics, objects = two_model_run
    nfe = {key.rsplit("/", 1)[0]: value for key, value in metrics.items() if key.endswith("/nfe")}
    # VP heun out of a finite-SNR trailing grid: 2·3 - 1; flow heun corrects out of pure noise too: 2·3 - 1
    assert nfe == {"vp/euler/3/3": 3, "vp/ddim/3/3": 3, "vp/heun/3/3": 5, "flow/euler/3/3": 3, "flow/heun/3/3": 5}
    assert all(metrics[f"{model}/euler/3/3/sec_per_image"] > 0 for model in ("vp", "flow"))
    rows = json.loads((run / "metrics.json").read_text())["rows"]
    assert [(r["model"], r["sampler"]) for r in rows] == [("vp", "euler"), ("vp", "ddim"), ("vp", "heun"),
                                                          ("flow", "euler"), ("flow", "heun")]
    report = (run / "report.md").read_text()
    metrics_section = report.split("## Metrics")[1].split("## ")[0]
    table = [line for line in metrics_section.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| model | sampler |") and len(table) == 1 + 5
    assert any(line.startswith("| flow | heun | 3 | 3 | 5 |") for line in table)
    assert "Model flow: ldm artifact" in report and "Model vp: ldm artifact" in report
    assert "Model flow: ddim not run (defined for variance-preserving processes only" in report
    assert {key[0] for key in objects["grids"]} == {"vp: euler", "vp: ddim", "vp: heun", "flow: euler", "flow: heun"}
    assert "vp" in report.splitlines()[0] and "flow" in report.splitlines()[0]  # the title names both


def test_each_models_rows_are_what_its_own_run_measures(two_model_run, flow_artifact, tmp_path):
    _, metrics, objects = two_model_run
    alone, alone_objects = run_eval([f"ckpt={flow_artifact}", "samplers=[euler,heun]", "steps=[3]", "guidance=[3]",
                                     "grid_prompts=2", *FAST], tmp_path)
    for sampler in ("euler", "heun"):
        assert metrics[f"flow/{sampler}/3/3/clip_score"] == alone[f"{sampler}/3/3/clip_score"]
        assert torch.equal(objects["grids"][(f"flow: {sampler}", 3, 3.0)], alone_objects["grids"][(sampler, 3, 3.0)])
    assert not torch.equal(objects["grids"][("flow: euler", 3, 3.0)], objects["grids"][("vp: euler", 3, 3.0)])


def test_a_list_of_artifacts_is_labelled_by_run_folder(tiny_artifacts, flow_artifact, tmp_path):
    assert run_folder_label(flow_artifact) == flow_artifact.parent.name  # …/<run>/artifact -> <run>
    assert [label for label, _ in named_ckpts(["/a/ldm", "/b/ldm", "/c/x"])] == ["ldm#1", "ldm#2", "x"]
    plan = plan_sampled_sets(compose_eval([f"ckpt=[{tiny_artifacts['ldm']},{flow_artifact}]", "samplers=[euler]",
                                           "steps=[3]", "guidance=[3]", *FAST], tmp_path))
    assert [m.label for m in plan.models] == ["ldm", flow_artifact.parent.name]
    assert [m.config["process"]["kind"] for m in plan.models] == ["vp_discrete", "rectified_flow"]


def test_samplers_must_fit_some_model_and_every_model_needs_one(tiny_artifacts, flow_artifact, tmp_path):
    both = [f"ckpt={{vp:{tiny_artifacts['ldm']},flow:{flow_artifact}}}", "steps=[3]", "guidance=[3]", *FAST]
    with pytest.raises(EvalConfigError, match=r"ddim fit\(s\) none of the models|every model needs a sampler"):
        plan_sampled_sets(compose_eval([*both, "samplers=[ddim]"], tmp_path))  # the flow model would get none
    plan = plan_sampled_sets(compose_eval([*both, "samplers=[euler]"], tmp_path))
    assert [len(m.settings) for m in plan.models] == [1, 1] and plan.model_notes == []


def test_bad_model_entries_and_sizes_fail_before_any_weight(tiny_artifacts, flow_artifact, tmp_path):
    base = ["samplers=[euler]", "steps=[3]", "guidance=[3]", *FAST]
    with pytest.raises(EvalConfigError, match=r"model 'flow': ckpt='.*nowhere'.*does not exist"):
        plan_sampled_sets(compose_eval([f"ckpt={{vp:{tiny_artifacts['ldm']},flow:{tmp_path / 'nowhere'}}}", *base], tmp_path))
    with pytest.raises(EvalConfigError, match="ckpt is an empty list"):
        plan_sampled_sets(compose_eval(["ckpt=[]", *base], tmp_path))
    with pytest.raises(EvalConfigError, match=r"task=txt2img draws from one model.*pass ckpt=PATH"):
        run_eval([f"ckpt=[{tiny_artifacts['ldm']},{flow_artifact}]", "task=txt2img", "prompt=a red circle",
                  "sampler=euler", "steps=3", "guidance=3", "logger=none"], tmp_path)
    # the tiny UNet has two levels: latents must be multiples of 2, i.e. images multiples of 8 (f4 autoencoder)
    with pytest.raises(EvalConfigError, match=r"height=36, width=32: the unet backbone needs latent sides that are "
                                              r"multiples of 2.*9x8 latents.*multiples of 8, for ckpt="):
        plan_sampled_sets(compose_eval([f"ckpt={tiny_artifacts['ldm']}", "height=36", "width=32", *base], tmp_path))
