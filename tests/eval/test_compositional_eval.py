"""The compositional suite inside `eval.py`: a metric's own prompts are drawn after the run's prompt set and
scored by it alone (the other metrics' numbers do not move), grids per category, and the report through
the real config (conf/metrics/compositional.yaml)."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from ldmkit.eval.metrics.base import Metric, OwnPrompts, SampledBatch
from ldmkit.eval.report import _grid_sections, grid_label
from ldmkit.eval.sampling import (
    PromptSet, Setting, evaluate_settings, make_prompt_set, merge_group_grids, merge_shards, plan_batches,
    rank_batches, sample_shard,
)
from ldmkit.txt2img import load_text_to_image
from tests.eval.test_eval_cli import TINY, run_eval

MEASURED = ("sec_per_image", "peak_mem_mb")
MAIN = ["a red circle", "a small blue square on the left", "a green star", "a large yellow cross", "a purple diamond"]
OWN = OwnPrompts(["an image showing one red star", "an image showing two blue circles", "an image showing a cyan cross"],
                 [900, 901, 902], [{"category": "counting"}, {"category": "counting"}, {"category": "size"}],
                 grids={"counting": [0, 1], "size": [2]})


class Recorder(Metric):
    """Records the samples it scores and a pixel statistic of each (a stand-in for any image metric)."""

    row = {}

    def __init__(self, name: str, own: OwnPrompts | None = None):
        self.name, self.own = name, own

    def own_prompts(self, context) -> OwnPrompts | None:
        return self.own

    def update(self, batch: SampledBatch) -> list[tuple[int, str, float]]:
        return [(i, p, float(im.mean())) for i, p, im in zip(batch.indices, batch.prompts, batch.images)]

    def merge(self, partials) -> dict:
        return {f"{self.name}_seen": [entry for part in partials for entry in part]}


@pytest.fixture(scope="module")
def t2i(tiny_artifacts):
    return load_text_to_image(tiny_artifacts["ldm"])


def test_own_prompts_follow_the_prompt_set_and_are_scored_by_their_metric_alone(t2i):
    main, suite = Recorder("main"), Recorder("suite", OWN)
    ps = make_prompt_set(MAIN, 5, base_seed=40).with_own_prompts("suite", OWN)
    assert ps.prompts == MAIN + OWN.prompts and ps.seeds == [40, 41, 42, 43, 44, 900, 901, 902]
    assert ps.owners == [None] * 5 + ["suite"] * 3 and ps.grids == {"counting": [5, 6], "size": [7]}
    setting = Setting("euler_a", 2, 3.0)
    batches = plan_batches(len(ps), 3)  # the batch [3, 4, 5] mixes both sets
    kwargs = dict(height=32, width=32, grid_size=2)
    single = sample_shard(t2i, ps, setting, rank_batches(batches, 0, 1), [main, suite], **kwargs)
    row, grid = merge_shards([single], setting, [main, suite])
    assert [i for i, _, _ in row["main_seen"]] == [0, 1, 2, 3, 4]
    assert [(i, p) for i, p, _ in row["suite_seen"]] == [(5, OWN.prompts[0]), (6, OWN.prompts[1]), (7, OWN.prompts[2])]
    assert row["num_images"] == 8 and grid.shape == (3, 32, 2 * 32)  # the run's grid: its first 2 prompts only
    # the run's metrics measure what they measure without the suite
    alone = sample_shard(t2i, make_prompt_set(MAIN, 5, base_seed=40), setting, rank_batches(plan_batches(5, 3), 0, 1),
                         [main], **kwargs)
    assert merge_shards([alone], setting, [main])[0]["main_seen"] == row["main_seen"]
    # group grids, and two ranks merge to the single-process result
    shards = [sample_shard(t2i, ps, setting, rank_batches(batches, r, 2), [main, suite], **kwargs) for r in range(2)]
    groups_1, groups_2 = merge_group_grids([single], ps.grids), merge_group_grids(shards, ps.grids)
    assert set(groups_1) == {"counting", "size"} and groups_1["counting"].shape == (3, 32, 2 * 32)
    assert all(torch.equal(groups_1[k], groups_2[k]) for k in groups_1)
    sharded = merge_shards(shards, setting, [main, suite])[0]
    def comparable(r: dict) -> dict:
        return {k: v for k, v in r.items() if k not in MEASURED}

    assert comparable(sharded) == comparable(row)


def test_evaluate_settings_keys_group_grids_by_label_and_setting(t2i):
    ps = PromptSet(MAIN[:2], [1, 2], [None, None], "test").with_own_prompts("suite", OWN)
    settings = [Setting("ddim", 2, 1.0), Setting("euler_a", 2, 3.0)]
    rows, grids = evaluate_settings(t2i, ps, settings, [Recorder("suite", OWN)], batch_size=4, height=32, width=32,
                                    grid_size=2)
    assert set(grids) == {key for s in settings for key in (s.key, ("counting", *s.key), ("size", *s.key))}
    sections = [name for name, _ in _grid_sections(grids)]
    assert sections == ["2 steps, guidance 1", "2 steps, guidance 3", "counting: 2 steps, guidance 1",
                        "counting: 2 steps, guidance 3", "size: 2 steps, guidance 1", "size: 2 steps, guidance 3"]
    assert grid_label(("size", "ddim", 2, 1.0)) == "size: ddim, 2 steps, guidance 1"


def test_eval_report_has_per_category_columns_grids_and_the_judges_accuracy(tiny_artifacts, tmp_path):
    metrics, objects = run_eval([
        f"ckpt={tiny_artifacts['ldm']}", "samplers=[ddim]", "steps=[2]", "guidance=[1,3]", "num_samples=4",
        "batch_size=4", "metrics=[clip_score,compositional]", "metrics.compositional.per_category=3",
        "metrics.compositional.grid_prompts=2", "metrics.compositional.judge_steps=5", "grid_prompts=2", *TINY[:3],
    ], tmp_path)
    run = tmp_path / "run"
    rows = json.loads((run / "metrics.json").read_text())["rows"]
    for row in rows:
        assert row["num_images"] == 4 + 4 * 3
        for category in ("counting", "binding", "position", "size"):
            assert row[f"comp_{category}_n"] == 3 and 0 <= row[f"comp_{category}"] <= 1
            assert row[f"comp_{category}_lo"] <= row[f"comp_{category}"] <= row[f"comp_{category}_hi"]
    assert "ddim/2/3/comp_counting" in metrics  # a scalar for loggers and sweepers
    markdown, page = (run / "report.md").read_text(), (run / "report.html").read_text()
    for text in (markdown, page):
        assert "counting acc ↑ [95% CI]" in text and "size acc ↑ [95% CI]" in text
        assert "counting: 2 steps, guidance 3" in text and "binding: 2 steps, guidance 1" in text
        assert "own accuracy on real rendered images" in text
        assert "an image showing" in text
    assert page.count("<figure>") == 2 + 2 * 4  # the run's grid and 4 category grids per setting
    assert len(objects["grids"]) == 2 + 2 * 4
    note = next(n for n in objects["notes"] if n.startswith("Compositional suite"))
    assert all(f"{c} " in note and "accepts" in note for c in ("counting", "binding", "position", "size"))
    assert "encoded and decoded by the model's own autoencoder" in note and "not measured" not in note


def test_the_autoencoder_ceiling_is_context_not_a_failure(tmp_path):
    """Real images that follow the prompts, round-tripped through the model's autoencoder: an autoencoder that
    cannot be loaded is said in the note, not raised."""
    from ldmkit.data.shapes import ShapesDataModule
    from ldmkit.eval.metrics.base import EvalContext
    from ldmkit.eval.metrics.compositional import CompositionalSuite
    from ldmkit.eval.objects import ObjectJudge

    metric = CompositionalSuite(per_category=2)
    metric.suite, metric.task = ShapesDataModule.compositional_suite(), ShapesDataModule.attribute_task()
    metric.judge = ObjectJudge(None, metric.task["palette"], metric.task["anchors"])
    context = EvalContext({"autoencoder": str(tmp_path / "gone")}, None, "test", None, 4, 32, 32, tmp_path, "")
    ceiling = metric.autoencoder_ceiling(context)
    assert ceiling.startswith("not measured") and "gone" in ceiling


def test_off_with_a_prompts_file_and_refused_when_required(tiny_artifacts, tmp_path):
    from ldmkit.eval.plan import EvalConfigError, plan_sampled_sets
    from tests.eval.test_eval_cli import compose_eval

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    common = [f"ckpt={tiny_artifacts['ldm']}", "metrics=[clip_score,compositional]", f"prompts_file={prompts}",
              "num_samples=2", "batch_size=2", *TINY[:3]]
    plan = plan_sampled_sets(compose_eval(common, tmp_path))
    assert [slot.name for slot in plan.metrics if slot.on] == ["clip_score"]  # auto: n/a without the data's suite
    assert "Compositional suite: n/a (needs data=shapes" in plan.metrics[1].cls.off_note()
    with pytest.raises(EvalConfigError, match="needs data=shapes .* without prompts_file"):
        plan_sampled_sets(compose_eval([*common, "metrics.compositional.mode=required"], tmp_path))


def test_partials_are_small_counters(tiny_artifacts):
    from ldmkit.eval.metrics.compositional import CompositionalSuite

    metric = CompositionalSuite(per_category=1)
    metric.suite = {"checked": {"counting": ("shape",)}}
    metric.judge = type("Judge", (), {"read": staticmethod(lambda images: [[{"shape": "star"}] for _ in images])})
    batch = SampledBatch([0, 1], torch.zeros(2, 3, 8, 8), ["x", "y"],
                         [{"category": "counting", "objects": [{"shape": "star"}]},
                          {"category": "counting", "objects": [{"shape": "star"}] * 2}])
    assert metric.update(batch) == Counter({("counting", "correct"): 1, ("counting", "wrong"): 1})


def test_group_grids_keep_their_label_when_a_report_holds_several_models():
    from pathlib import Path

    from ldmkit.eval.models import EvalModel
    from ldmkit.eval.sampled_sets import model_grid_key

    flow = EvalModel("flow", Path("."), {}, (Setting("euler", 4, 3.0),))
    assert model_grid_key(flow, ("euler", 4, 3.0)) == ("flow: euler", 4, 3.0)
    assert model_grid_key(flow, ("counting", "euler", 4, 3.0)) == ("counting", "flow: euler", 4, 3.0)
    assert grid_label(("counting", "flow: euler", 4, 3.0)) == "counting: flow: euler, 4 steps, guidance 3"
