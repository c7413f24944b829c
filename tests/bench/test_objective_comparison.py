"""bench/objective_comparison.py: the summary table (arms with a common name prefix kept apart, pooled
Wilson intervals) and the arms' overrides compose into train.py configs. The runs themselves are minutes
each: BENCHMARKS.md has their results."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import objective_comparison as oc  # noqa: E402


def write_result(out: Path, arm: str, seed: int, g3: int, g5: int, n: int = 216) -> None:
    run = out / f"{arm}_s{seed}"
    run.mkdir(parents=True)
    accuracy = {"guidance_3": {"colour+shape": g3 / n}, "guidance_5": {"colour+shape": g5 / n}}
    result = {"arm": arm, "seed": seed, "steps": 1300, "train_seconds": 500.0,
              "heldout": {"accuracy": accuracy, "num_images_per_setting": n}}
    (run / "result.json").write_text(json.dumps(result))


def test_summary_keeps_prefixed_arms_apart_and_pools_seeds(tmp_path):
    write_result(tmp_path, "flow_logit_normal", 42, 180, 170)
    write_result(tmp_path, "flow_logit_normal", 43, 160, 150)
    write_result(tmp_path, "flow_logit_normal_shift3", 42, 100, 90)
    args = argparse.Namespace(out=tmp_path, arms=["flow_logit_normal", "flow_logit_normal_shift3"])
    rows = oc.summarise(args).splitlines()[2:]
    plain, shifted = rows
    assert plain.startswith("| flow_logit_normal | 2 | 1300 |") and shifted.startswith("| flow_logit_normal_shift3 | 1 |")
    # mean of 83.3% and 74.1%; pooled 340 / 432 = 78.7%, whose Wilson 95% interval is [74.6, 82.3]
    assert "78.7 ± 6.5 [74.6–82.3]" in plain
    assert "46.3 ± nan" in shifted


@pytest.mark.parametrize("arm", sorted(oc.ARMS))
def test_every_arm_composes(arm):
    from hydra import compose, initialize_config_dir

    overrides, fraction = oc.ARMS[arm]
    assert 0 < fraction <= 1
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose("train", overrides=["experiment=quickstart_ldm", *overrides])
    assert cfg.backbone.arch == ("dit" if arm.startswith("dit") else "unet")
    assert cfg.model.loss.prediction == ("flow" if "flow" in arm else "eps" if "eps" in arm else "v")
    assert cfg.process._target_.endswith("RectifiedFlow") == ("flow" in arm)
    assert cfg.process.get("shift", 1.0) == (3.0 if "shift3" in arm else 1.0)


def test_nfe_curves_read_the_cache_and_skip_flow_grids_on_vp_arms(tmp_path):
    # every point cached (as a finished run leaves it): no sampling here; a VP arm asked for the flow-only
    # flow_sigmas grid would have no cache and fail, so the table must leave that series out for it
    arms = ["vp_v", "flow_logit_normal"]
    for arm in arms:
        for sampler, steps in oc.NFE_GRID.items():
            if oc._runs_on(arm, sampler):
                for n in steps:
                    cache = tmp_path / f"{arm}_s42" / "nfe" / f"{sampler}_{n}.json"
                    cache.parent.mkdir(parents=True, exist_ok=True)
                    cache.write_text(json.dumps({"guidance_3": {"colour+shape": n / 64}}))
    args = argparse.Namespace(out=tmp_path, arms=arms, seeds=[42], seeds_per_prompt=3, jobs=1)
    rows = oc.nfe_curves(args).splitlines()[2:]
    assert "| vp_v | dpmpp_2m@flow_sigmas |" not in "\n".join(rows)
    assert "| flow_logit_normal | dpmpp_2m@flow_sigmas | 6.2 | 12.5 | 25.0 | 50.0 |" in rows
    assert len(rows) == 2 * len(oc.NFE_GRID) - 1
    assert (tmp_path / "nfe_dpmpp_2m_flow_sigmas.svg").read_text().count("flow_logit_normal") >= 1
