"""Sampled sets: the same prompts and seeds drawn with every (sampler, steps, guidance) setting,
scored while they are drawn, sharded over processes.

Pairing: sample i of every setting has prompt i and seed `base_seed + i`, so every sampler starts
from the same initial noise for it (`TextToImage.generate` seeds noise per sample; stochastic
samplers' fresh noise is per sample too), and a sample does not depend on the batch it is drawn in.

Sharding: the sample list is cut into fixed global batches of `batch_size` first; batch j goes to
rank j % world_size. Each process keeps per-batch results (Inception features, CLIP score sums) keyed
by the global batch index, and rank 0 folds them in batch order, so N processes give bit for bit
the metrics of one process (floating-point sums are not reordered).

Streaming: images are scored per batch by every metric (`ldmkit.eval.metrics`: each returns a small
partial result) and then dropped; only the partials, a few grid images and counters are kept.

NFE: the number of denoiser evaluations per image, counted on the UNet itself (forward calls per
batch). With classifier-free guidance (guidance != 1) each evaluation is one forward of the batched
cond+uncond input (2B rows) and counts once; guidance == 1 runs the conditional half only.
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ldmkit.eval.fid import to_uint8_images
from ldmkit.eval.metrics.base import Metric, OwnPrompts, SampledBatch
from ldmkit.eval.pngmeta import GenerationParameters, save_png_with_parameters

Gather = Callable[[Any], list[Any]]  # all_gather_object: this rank's object -> every rank's, in rank order


@dataclass(frozen=True)
class Setting:
    sampler: str
    steps: int
    guidance: float

    @property
    def key(self) -> tuple[str, int, float]:
        """The report's grid key."""
        return (self.sampler, self.steps, self.guidance)

    @property
    def slug(self) -> str:
        return f"{self.sampler}_{self.steps}steps_cfg{self.guidance:g}"


def settings_grid(samplers: Sequence[str], steps: Sequence[int], guidance: Sequence[float]) -> list[Setting]:
    return [Setting(s, int(n), float(g)) for s in samplers for n in steps for g in guidance]


@dataclass
class PromptSet:
    """Sample i: prompts[i] from seeds[i]; targets[i] are the attributes the prompt asks for
    (`{"objects": [...]}`, for the prompt-accuracy judge) or None. owners[i] is None for the run's prompt
    set (scored by every metric without prompts of its own) or the name of the metric whose own prompt it
    is (`Metric.own_prompts`: scored by that metric alone); grids maps a label to samples shown together."""

    prompts: list[str]
    seeds: list[int]
    targets: list[dict | None]
    source: str = ""
    owners: list[str | None] = field(default_factory=list)
    grids: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.owners = list(self.owners) or [None] * len(self.prompts)
        if not len(self.prompts) == len(self.seeds) == len(self.targets) == len(self.owners):
            raise ValueError(f"{len(self.prompts)} prompts, {len(self.seeds)} seeds, {len(self.targets)} targets, "
                             f"{len(self.owners)} owners")

    def __len__(self) -> int:
        return len(self.prompts)

    def with_own_prompts(self, metric: str, own: OwnPrompts) -> PromptSet:
        """This set followed by `metric`'s own prompts (their grids' indices shifted to match)."""
        offset = len(self)
        grids = {**self.grids, **{label: [offset + k for k in samples] for label, samples in own.grids.items()}}
        return PromptSet(self.prompts + list(own.prompts), self.seeds + list(own.seeds),
                         self.targets + list(own.targets), self.source,
                         self.owners + [metric] * len(own.prompts), grids)


def make_prompt_set(prompts: Sequence[str], num_samples: int, base_seed: int,
                    targets: Sequence[dict | None] | None = None, source: str = "") -> PromptSet:
    """`num_samples` samples cycling through `prompts`; sample i is seeded `base_seed + i`."""
    indices = [i % len(prompts) for i in range(num_samples)]
    targets = list(targets) if targets is not None else [None] * len(prompts)
    return PromptSet([prompts[i] for i in indices], [base_seed + i for i in range(num_samples)],
                     [targets[i] for i in indices], source)


def plan_batches(num_samples: int, batch_size: int) -> list[range]:
    """Global batches of sample indices, formed before any sharding."""
    return [range(start, min(start + batch_size, num_samples)) for start in range(0, num_samples, batch_size)]


def rank_batches(batches: Sequence[range], rank: int, world_size: int) -> list[tuple[int, range]]:
    """(global batch index, samples) of the batches this rank draws: batch j goes to rank j % world_size."""
    return [(j, batch) for j, batch in enumerate(batches) if j % world_size == rank]


@dataclass
class ShardResult:
    """What one process measured for one setting (small and picklable, for all_gather_object)."""

    partials: dict[str, dict[int, Any]] = field(default_factory=dict)  # metric name -> batch j -> partial
    images: int = 0
    seconds: float = 0.0
    peak_mem_mb: float | None = None
    nfe: int | None = None
    grid: dict[int, Tensor] = field(default_factory=dict)  # sample index -> uint8 (3, H, W)
    group_grid: dict[int, Tensor] = field(default_factory=dict)  # the same, for the samples of `PromptSet.grids`


class ForwardCounter:
    """Counts a module's forward calls (the UNet's: one per denoiser evaluation, CFG batched)."""

    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        self._handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: Any) -> None:
        self.calls += 1

    def close(self) -> None:
        self._handle.remove()


def memory_kind(device: torch.device) -> str:
    return "cuda" if device.type == "cuda" else "cpu_rss"


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak allocated by torch since `reset_peak_memory` (this setting). CPU: the process's
    RSS high-water mark (ru_maxrss), which only grows: it covers everything the process did so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generation_parameters(t2i: Any, setting: Setting, prompt: str, negative_prompt: str, seed: int,
                          width: int, height: int, guidance_rescale: float = 0.0,
                          sampler_options: Mapping[str, Any] | None = None) -> GenerationParameters:
    extra = {"Guidance rescale": f"{guidance_rescale:g}"} if guidance_rescale else {}
    extra.update({f"Sampler {k}": str(v) for k, v in (sampler_options or {}).items() if v is not None})
    return GenerationParameters(
        prompt=prompt, negative_prompt=negative_prompt, steps=setting.steps, sampler=setting.sampler,
        cfg_scale=setting.guidance, seed=int(seed), size=(width, height), model_hash=t2i.model_hash or None,
        model=t2i.name or None, extra=extra,
    )


def sample_shard(
    t2i: Any,
    prompt_set: PromptSet,
    setting: Setting,
    batches: Sequence[tuple[int, range]],
    metrics: Sequence[Metric],
    *,
    height: int,
    width: int,
    negative_prompt: str = "",
    guidance_rescale: float = 0.0,
    sampler_options: Mapping[str, Any] | None = None,
    grid_size: int = 0,
    image_dir: str | Path | None = None,
) -> ShardResult:
    """Draw and score this rank's `batches` with one setting."""
    device = t2i.device
    result = ShardResult()
    reset_peak_memory(device)
    options = dict(sampler_options or {})
    grouped = {i for samples in prompt_set.grids.values() for i in samples}
    for number, (j, batch) in enumerate(batches):
        prompts = [prompt_set.prompts[i] for i in batch]
        seeds = [prompt_set.seeds[i] for i in batch]
        counter = ForwardCounter(t2i.unet) if number == 0 else None
        _sync(device)
        start = time.perf_counter()
        images = t2i.generate(
            prompts, seeds, negative_prompts=[negative_prompt] * len(prompts) if negative_prompt else None,
            sampler=setting.sampler, steps=setting.steps, guidance_scale=setting.guidance,
            guidance_rescale=guidance_rescale, height=height, width=width, **options,
        )  # (B, 3, H, W) in [-1, 1]
        _sync(device)
        result.seconds += time.perf_counter() - start
        if counter is not None:
            result.nfe = counter.calls
            counter.close()
        result.images += len(prompts)
        _score_batch(result, j, batch, images, prompt_set, metrics)
        for k, i in enumerate(batch):
            if i < grid_size and prompt_set.owners[i] is None:
                result.grid[i] = to_uint8_images(images[k : k + 1]).cpu()[0]
            elif i in grouped:
                result.group_grid[i] = to_uint8_images(images[k : k + 1]).cpu()[0]
            if image_dir is not None:
                params = generation_parameters(t2i, setting, prompt_set.prompts[i], negative_prompt,
                                               prompt_set.seeds[i], width, height, guidance_rescale, options)
                save_png_with_parameters(images[k], Path(image_dir) / setting.slug / f"{i:05d}.png", params,
                                         overwrite=False)
    result.peak_mem_mb = peak_memory_mb(device)
    return result


@torch.no_grad()
def _score_batch(result: ShardResult, j: int, batch: range, images: Tensor, prompt_set: PromptSet,
                 metrics: Sequence[Metric]) -> None:
    owners = set(prompt_set.owners)
    by_owner: dict[str | None, SampledBatch] = {}  # one batch per owner: metrics share its cached features
    for metric in metrics:
        owner = metric.name if metric.name in owners else None
        if owner not in by_owner:
            keep = [k for k, i in enumerate(batch) if prompt_set.owners[i] == owner]
            if not keep:
                continue
            picked = [batch[k] for k in keep]
            by_owner[owner] = SampledBatch(picked, images if len(keep) == len(batch) else images[keep],
                                           [prompt_set.prompts[i] for i in picked],
                                           [prompt_set.targets[i] for i in picked])
        result.partials.setdefault(metric.name, {})[j] = metric.update(by_owner[owner])


def empty_row(metric_classes: Sequence[type[Metric]]) -> dict[str, Any]:
    """The n/a fields of every configured metric, on or off."""
    return {key: value for cls in metric_classes for key, value in cls.row.items()}


def merge_shards(
    shards: Sequence[ShardResult],
    setting: Setting,
    metrics: Sequence[Metric],
    *,
    off: Sequence[type[Metric]] = (),
) -> tuple[dict[str, Any], Tensor | None]:
    """One report row (see `ldmkit.eval.report`) and the setting's grid from every rank's shard;
    `off` are the metrics configured but not measured (their fields stay n/a)."""
    images = sum(shard.images for shard in shards)
    row: dict[str, Any] = {
        "sampler": setting.sampler, "steps": setting.steps, "guidance": setting.guidance,
        "nfe": next((shard.nfe for shard in shards if shard.nfe is not None), None),
        **empty_row([*(type(m) for m in metrics), *off]),
        "sec_per_image": sum(shard.seconds for shard in shards) / images if images else None,
        "peak_mem_mb": max((s.peak_mem_mb for s in shards if s.peak_mem_mb is not None), default=None),
        "num_images": images,
    }
    for metric in metrics:
        partials = {j: p for shard in shards for j, p in shard.partials.get(metric.name, {}).items()}
        if partials:
            row.update(metric.merge([partials[j] for j in sorted(partials)]))  # global batch order
    grid_images = {i: im for shard in shards for i, im in shard.grid.items()}
    grid = torch.cat([grid_images[i] for i in sorted(grid_images)], dim=2) if grid_images else None  # (3, H, K·W)
    return row, grid


def merge_group_grids(shards: Sequence[ShardResult], groups: Mapping[str, Sequence[int]]) -> dict[str, Tensor]:
    """label -> the label's samples side by side (3, H, K·W), from every rank's shard."""
    images = {i: im for shard in shards for i, im in shard.group_grid.items()}
    return {label: torch.cat([images[i] for i in samples], dim=2) for label, samples in groups.items()
            if samples and all(i in images for i in samples)}


def evaluate_settings(
    t2i: Any,
    prompt_set: PromptSet,
    settings: Sequence[Setting],
    metrics: Sequence[Metric],
    *,
    batch_size: int,
    height: int,
    width: int,
    rank: int = 0,
    world_size: int = 1,
    gather: Gather | None = None,
    off: Sequence[type[Metric]] = (),
    negative_prompt: str = "",
    guidance_rescale: float = 0.0,
    sampler_options: Mapping[str, Mapping[str, Any]] | None = None,
    grid_size: int = 8,
    image_dir: str | Path | None = None,
    on_setting: Callable[[Setting, dict[str, Any]], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[tuple, Tensor]]:
    """Rows and grids of every setting (complete on rank 0; empty on the other ranks).

    `gather` is all_gather_object over the process group (None: a single process). `metrics` are set
    up (`Metric.setup`); `off` are configured metrics that are not measured (n/a fields).
    `sampler_options` maps a sampler name to the options it gets (eta, spacing, ...). Grids are keyed by
    `setting.key` (the first `grid_size` prompts) and `(label, *setting.key)` for each of `prompt_set.grids`.
    """
    gather = gather or (lambda obj: [obj])
    batches = rank_batches(plan_batches(len(prompt_set), batch_size), rank, world_size)
    rows, grids = [], {}
    for setting in settings:
        shard = sample_shard(
            t2i, prompt_set, setting, batches, metrics, height=height, width=width,
            negative_prompt=negative_prompt, guidance_rescale=guidance_rescale,
            sampler_options=(sampler_options or {}).get(setting.sampler), grid_size=grid_size, image_dir=image_dir,
        )
        shards = gather(shard)
        if rank != 0:
            continue
        row, grid = merge_shards(shards, setting, metrics, off=off)
        rows.append(row)
        if grid is not None:
            grids[setting.key] = grid
        for label, group_grid in merge_group_grids(shards, prompt_set.grids).items():
            grids[(label, *setting.key)] = group_grid
        if on_setting is not None:
            on_setting(setting, row)
    return rows, grids


def format_row(row: Mapping[str, Any]) -> str:
    """One log line per finished setting."""
    def num(key: str, spec: str) -> str:
        value = row.get(key)
        return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)

    accuracy = row.get("prompt_accuracy")
    both = "n/a" if not accuracy else f"{100 * accuracy['both']:.1f}%"
    return (f"{row['sampler']} steps={row['steps']} guidance={row['guidance']:g}: NFE {num('nfe', 'd')}, "
            f"FID {num('fid', '.2f')}, KID {num('kid_mean', '.4f')}, CLIP {num('clip_score', '.2f')}, "
            f"accuracy {both}, {num('sec_per_image', '.3g')} s/image")
