"""Sampled sets (ldmkit.eval.sampling): global batches, sharding, pairing, streaming scores, NFE."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ldmkit.diffusion import nfe
from ldmkit.eval.fid import FeatureStats
from ldmkit.data.shapes import ShapesDataModule
from ldmkit.eval.metrics.clip_score import CLIPScoreMetric
from ldmkit.eval.metrics.fid import FID, InceptionReference
from ldmkit.eval.metrics.kid import KID
from ldmkit.eval.metrics.prompt_accuracy import PromptAccuracy
from ldmkit.eval.sampling import (
    PromptSet,
    Setting,
    evaluate_settings,
    make_prompt_set,
    merge_shards,
    plan_batches,
    rank_batches,
    sample_shard,
)
from ldmkit.txt2img import fresh_noise_seed, load_text_to_image, per_sample_generators, seeded_noise

PROMPTS = ["a red circle", "a small blue square on the left", "a green star", "a large yellow cross", "a purple diamond"]
TARGETS = [{"objects": [{"colour": c, "shape": s}]} for c, s in
           [("red", "circle"), ("blue", "square"), ("green", "star"), ("yellow", "cross"), ("purple", "diamond")]]
TARGETS[3] = {"objects": [{"colour": "yellow", "shape": "cross"}, {"colour": "red", "shape": "star"}]}  # not judged
MEASURED = ("sec_per_image", "peak_mem_mb")  # wall-clock facts, not functions of the images


@pytest.fixture(scope="module")
def t2i(tiny_artifacts):
    return load_text_to_image(tiny_artifacts["ldm"])


@pytest.fixture(scope="module")
def clip_score(tiny_artifacts):
    from ldmkit.eval.clip_score import CLIPScore
    from ldmkit.nn.clip import load_clip

    model, tokenizer, _ = load_clip(tiny_artifacts["clip"])
    return CLIPScore.from_open_clip(model, tokenizer, model_name="tiny clip")


def pixel_features(images: torch.Tensor) -> torch.Tensor:
    """A stand-in for Inception: fixed random projection of 4x4 mean-pooled pixels (B, 16)."""
    pooled = torch.nn.functional.avg_pool2d(images.float() / 255, 8).flatten(1)  # (B, 48)
    projection = torch.randn(pooled.shape[1], 16, generator=torch.Generator().manual_seed(0))
    return pooled @ projection


def colour_judge(images: torch.Tensor) -> list[dict]:
    """A stand-in judge: the dominant channel names the colour, the shape is always 'circle'."""
    names = ("red", "green", "blue")
    return [{"objects": [{"colour": names[int(im.mean((1, 2)).argmax())], "shape": "circle"}]} for im in images]


def reference_features(n: int = 12) -> FeatureStats:
    stats = FeatureStats()
    stats.update_features(np.random.default_rng(0).normal(size=(n, 16)).astype(np.float32))
    return stats


def stand_in_metrics(clip_score, reference: FeatureStats, kid_subsets: int, kid_subset_size: int) -> list:
    """FID, KID, CLIP score and prompt accuracy on the stand-ins above (set up by hand: nothing is loaded)."""
    inception = InceptionReference(weights=None, extractor=pixel_features, stats=reference)
    fid, kid = FID(), KID(kid_subsets, kid_subset_size)
    fid.reference = kid.reference = inception
    clip = CLIPScoreMetric()
    clip.source, clip.scorer = (None, None, "tiny clip"), clip_score
    accuracy = PromptAccuracy()
    accuracy.task, accuracy.judge = ShapesDataModule.attribute_task(), type("Judge", (), {"predict": staticmethod(colour_judge)})
    return [fid, kid, clip, accuracy]


def comparable(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in MEASURED}


def test_batches_are_formed_globally_then_dealt_round_robin():
    batches = plan_batches(10, 4)
    assert [list(b) for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    ranks = [rank_batches(batches, r, 2) for r in range(2)]
    assert [j for j, _ in ranks[0]] == [0, 2] and [j for j, _ in ranks[1]] == [1]
    dealt = sorted(i for shard in ranks for _, b in shard for i in b)
    assert dealt == list(range(10))  # every sample exactly once
    assert rank_batches(batches, 3, 4) == []  # more ranks than batches: idle, not duplicated


def test_prompt_set_seeds_are_base_plus_index_and_prompts_cycle():
    ps = make_prompt_set(["a", "b"], 5, base_seed=100)
    assert ps.prompts == ["a", "b", "a", "b", "a"]
    assert ps.seeds == [100, 101, 102, 103, 104]


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m_sde", "ddpm"])
def test_stochastic_samplers_draw_each_sample_independently_of_its_batch(t2i, sampler):
    together = t2i.generate(PROMPTS[:3], [5, 6, 7], sampler=sampler, steps=3, guidance_scale=3.0)
    alone = t2i.generate(PROMPTS[1:2], [6], sampler=sampler, steps=3, guidance_scale=3.0)
    torch.testing.assert_close(alone[0], together[1], rtol=0, atol=1e-5)
    # the fresh noise is used and comes from the sample's own stream: another stream, another image
    other = t2i.generate(PROMPTS[1:2], [6], sampler=sampler, steps=3, guidance_scale=3.0,
                         generator=per_sample_generators([999]))
    assert (other - alone).abs().max() > 1e-3


def test_fresh_noise_stream_is_not_the_initial_noise_stream():
    seeds = [0, 1, 2]
    assert len({fresh_noise_seed(s) for s in seeds} | set(seeds)) == 2 * len(seeds)
    initial = seeded_noise(seeds, (4, 8, 8))
    fresh = torch.stack([torch.randn((4, 8, 8), generator=g) for g in per_sample_generators(seeds)])
    assert not torch.allclose(initial, fresh)


@pytest.mark.parametrize("sampler,guidance", [("ddim", 1.0), ("ddim", 3.0), ("heun", 3.0), ("plms", 3.0)])
def test_nfe_counts_unet_forwards_and_cfg_counts_once(t2i, sampler, guidance):
    ps = make_prompt_set(PROMPTS[:2], 2, base_seed=0)
    batches = rank_batches(plan_batches(2, 2), 0, 1)
    shard = sample_shard(t2i, ps, Setting(sampler, 4, guidance), batches, [], height=32, width=32)
    assert shard.nfe == nfe(sampler, 4)  # the solver library's own count, same with or without CFG
    assert shard.images == 2 and shard.seconds > 0 and shard.peak_mem_mb > 0


def test_sharded_shards_merge_to_the_single_process_result(t2i, clip_score):
    """The two ranks' shards, merged, give bit for bit what one process measures (FID, KID with
    subsets smaller than the set: order-sensitive, CLIP score sums, accuracy counts, grid)."""
    ps = PromptSet(PROMPTS * 2, list(range(40, 50)), TARGETS * 2, "test")
    setting = Setting("euler_a", 3, 3.0)
    metrics = stand_in_metrics(clip_score, reference_features(), kid_subsets=10, kid_subset_size=5)
    batches = plan_batches(len(ps), 3)
    kwargs = dict(height=32, width=32, grid_size=4)
    single = sample_shard(t2i, ps, setting, rank_batches(batches, 0, 1), metrics, **kwargs)
    shards = [sample_shard(t2i, ps, setting, rank_batches(batches, r, 2), metrics, **kwargs) for r in range(2)]
    row_1, grid_1 = merge_shards([single], setting, metrics)
    row_2, grid_2 = merge_shards(shards, setting, metrics)
    assert comparable(row_1) == comparable(row_2)
    assert torch.equal(grid_1, grid_2) and grid_1.shape == (3, 32, 4 * 32)
    assert math.isfinite(row_1["fid"]) and row_1["fid"] > 0 and row_1["kid_std"] > 0
    assert row_1["judged_prompts"] == 8 and row_1["num_images"] == 10
    # KID reads features in global order: folding rank 1's batches first would change it
    swapped = merge_shards([shards[1], shards[0]], setting, metrics)[0]
    assert comparable(swapped) == comparable(row_1)


def test_same_seeds_same_metrics_and_every_setting_gets_the_same_noise(t2i, clip_score, monkeypatch):
    ps = make_prompt_set(PROMPTS, 5, base_seed=7, targets=TARGETS)
    settings = [Setting("ddim", 3, 1.0), Setting("euler_a", 3, 3.0)]
    metrics = stand_in_metrics(clip_score, reference_features(), kid_subsets=5, kid_subset_size=4)
    calls: list[tuple[str, list[int], list[str]]] = []
    generate = type(t2i).generate

    def spy(self, prompts, seeds, **kwargs):
        calls.append((kwargs["sampler"], list(seeds), list(prompts)))
        return generate(self, prompts, seeds, **kwargs)

    monkeypatch.setattr(type(t2i), "generate", spy)
    kwargs = dict(batch_size=2, height=32, width=32)
    first, grids = evaluate_settings(t2i, ps, settings, metrics, **kwargs)
    second, _ = evaluate_settings(t2i, ps, settings, metrics, **kwargs)
    assert [comparable(r) for r in first] == [comparable(r) for r in second]
    assert set(grids) == {s.key for s in settings}
    per_sampler = {s: [(seeds, prompts) for name, seeds, prompts in calls if name == s] for s in ("ddim", "euler_a")}
    assert per_sampler["ddim"] == per_sampler["euler_a"]  # paired: same prompts and seeds in the same batches
    assert [seed for seeds, _ in per_sampler["ddim"][:3] for seed in seeds] == [7, 8, 9, 10, 11]
    # and the metrics do depend on the seeds
    moved, _ = evaluate_settings(t2i, make_prompt_set(PROMPTS, 5, base_seed=8, targets=TARGETS), settings, metrics, **kwargs)
    assert moved[1]["clip_score"] != first[1]["clip_score"] and moved[1]["fid"] != first[1]["fid"]
