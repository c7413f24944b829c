"""`python eval.py` (task=sampled_sets): the same prompts and seeds drawn with every sampler x steps x
guidance setting, scored side by side, in one or many processes.

`ldmkit.eval.plan` checks everything first; then Lightning Fabric starts the processes
(`ldmkit.eval.processes`), the metrics load (rank 0 first, filling caches), each process draws its
share of the global batches (`ldmkit.eval.sampling`), and rank 0 merges, writes report.md /
report.html / metrics.json into the run folder (`ldmkit.eval.report`) and logs to the loggers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ldmkit.eval.errors import EvalConfigError
from ldmkit.eval.loggers import log_to_loggers, scalar_metrics
from ldmkit.eval.models import MODEL_COLUMN, EvalModel
from ldmkit.eval.plan import SampledSetsPlan, plan_sampled_sets
from ldmkit.eval.processes import launched, make_fabric, make_gather, rank_zero_first, shared_by_rank_zero
from ldmkit.eval.report import (claim_report_suffix, release_report_suffix, report_columns, write_metrics_json,
                                write_report)
from ldmkit.eval.sampling import PromptSet, Setting, evaluate_settings, format_row, make_prompt_set

log = logging.getLogger(__name__)


def heldout_captions(datamodule: Any, split: str, count: int) -> tuple[list[str], list[dict]]:
    """The first `count` captions (and attributes) of the split, in order."""
    captions: list[str] = []
    targets: list[dict] = []
    for batch in datamodule.dataloader(split):
        captions += list(batch["caption"])
        targets += list(batch.get("attributes") or [{}] * len(batch["caption"]))
        if len(captions) >= count:
            break
    if len(captions) < count:
        raise EvalConfigError(f"the '{split}' split yielded only {len(captions)} captions, num_samples={count}; "
                              "lower num_samples.")
    return captions[:count], targets[:count]


def build_prompt_set(plan: SampledSetsPlan) -> PromptSet:
    """The run's prompts, then each metric's own (a prompt suite: drawn with every setting, scored by it alone)."""
    if plan.file_prompts is not None:
        prompt_set = make_prompt_set(plan.file_prompts, plan.num_samples, plan.base_seed,
                                     source=f"prompts file ({len(plan.file_prompts)} prompts, cycled)")
    else:
        captions, targets = heldout_captions(plan.datamodule, plan.split, plan.num_samples)
        name = getattr(plan.datamodule, "name", "data")
        prompt_set = make_prompt_set(captions, plan.num_samples, plan.base_seed, targets,
                                     source=f"the first {plan.num_samples} captions of the {name} '{plan.split}' split")
    for metric in plan.active:
        own = metric.own_prompts(plan.context)
        if own is not None:
            prompt_set = prompt_set.with_own_prompts(metric.name, own)
    return prompt_set


def run_notes(plan: SampledSetsPlan, loaded: Sequence[tuple[EvalModel, str]], prompt_set: PromptSet, world_size: int,
              device: Any) -> list[str]:
    """How the sampling itself was measured (the metrics add their own notes); `loaded`: (model, weights hash)."""
    models = [f"Model{'' if model.label is None else ' ' + model.label}: ldm artifact {model.path} (weights hash "
              f"{model_hash}), samples {plan.width}x{plan.height}." for model, model_hash in loaded]
    if len(loaded) > 1:
        models.append(f"{len(loaded)} models, each drawn with the same prompts and seeds and every setting its process "
                      "defines; metrics that score with the LDM's own text encoder (clip=null) use the first model's "
                      f"({plan.ldm_config.get('text_encoder')}) for every model.")
    return [
        *models,
        f"Prompts: {prompt_set.source}; sample i is seeded {plan.base_seed} + i, the same for every setting "
        "(paired: every sampler starts from the same noise for a prompt)"
        + (f"; negative prompt {plan.negative_prompt!r}" if plan.negative_prompt else "") + ".",
        "NFE = denoiser evaluations per image, counted as UNet forward calls per batch. With classifier-free "
        "guidance (guidance != 1) one evaluation is one forward of the batched cond+uncond input (2B rows) and "
        "counts once; guidance = 1 runs the conditional half only.",
        "Sampler options: " + "; ".join(f"{name} {options}" for name, options in plan.sampler_options.items())
        + (f"; guidance rescale {plan.guidance_rescale:g}" if plan.guidance_rescale else "") + ".",
        f"s / image = sampling time (text encoding, denoising and decoding; not scoring) summed over the "
        f"{world_size} process(es), divided by the number of images, batches of {plan.batch_size}.",
        ("peak mem = torch.cuda.max_memory_allocated during the setting (max over processes)." if device.type == "cuda"
         else "peak mem = CPU process RSS high-water mark (ru_maxrss, max over processes): it never decreases, so "
              "it covers everything the process did up to the end of that setting, not the setting alone."),
        *plan.model_notes,
    ]


def model_grid_key(model: EvalModel, key: tuple) -> tuple:
    """A setting's grid key for this model; a labelled group's (a metric's own prompts) keeps its label first."""
    return (key[0], *model.key(Setting(*key[1:]))) if len(key) == 4 else model.key(Setting(*key))


def evaluate_models(plan: SampledSetsPlan, prompt_set: PromptSet, device: Any, *, rank: int, world_size: int,
                    gather: Any, image_dir: Path | None) -> tuple[list[dict], dict, list[tuple[EvalModel, str]]]:
    """Every model's rows (tagged `model` when there are several) and grids, one model in memory at a time."""
    from ldmkit.txt2img import load_text_to_image

    rows, grids, loaded = [], {}, []
    for model in plan.models:
        t2i = load_text_to_image(model.path, device)
        loaded.append((model, t2i.model_hash))
        if device.type == "cuda":  # first-call costs (cuBLAS/cuDNN init) stay out of the timings
            first = model.settings[0]
            t2i.generate(prompt_set.prompts[:1], prompt_set.seeds[:1], sampler=first.sampler, steps=min(first.steps, 2),
                         guidance_scale=first.guidance, height=plan.height, width=plan.width)
        prefix = "" if model.label is None else f"{model.label}: "
        if rank == 0:
            log.info("Evaluating %s%s (%s): %d settings x %d samples on %d process(es), %s", prefix, model.path,
                     t2i.model_hash, len(model.settings), plan.num_samples, world_size, device)
        model_rows, model_grids = evaluate_settings(
            t2i, prompt_set, model.settings, plan.active, batch_size=plan.batch_size, height=plan.height,
            width=plan.width, rank=rank, world_size=world_size, gather=gather, off=plan.inactive,
            negative_prompt=plan.negative_prompt, guidance_rescale=plan.guidance_rescale,
            sampler_options=plan.sampler_options, grid_size=plan.grid_size,
            image_dir=None if image_dir is None else image_dir / (model.label or ""),
            on_setting=lambda setting, row: log.info(prefix + format_row(row)),
        )
        rows += [row if model.label is None else {"model": model.label, **row} for row in model_rows]
        grids.update({model_grid_key(model, key): grid for key, grid in model_grids.items()})
        del t2i  # the next model loads into the memory this one held
    return rows, grids, loaded


def metric_notes(plan: SampledSetsPlan, rows: Sequence[dict]) -> list[str]:
    notes = []
    for slot in plan.metrics:
        note = slot.metric.note(plan.context, rows) if slot.metric is not None else slot.cls.off_note()
        if note:
            notes.append(note)
    return notes


def run_sampled_sets(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    plan = plan_sampled_sets(cfg)  # every check before a process starts or a weight is read
    fabric = make_fabric(plan.accelerator, plan.devices, plan.num_nodes)
    with launched(fabric):
        rank, world_size, device = fabric.global_rank, fabric.world_size, fabric.device
        gather = make_gather(world_size)
        plan.context.device = device
        prompt_set = build_prompt_set(plan)
        for metric in plan.active:  # rank 0 first: it fills the caches (reference statistics, the judge)
            rank_zero_first(rank, gather, lambda metric=metric: metric.setup(plan.context))
        # torchrun-started ranks each composed their own run folder: use rank 0's, and its free report names
        output_dir = shared_by_rank_zero(gather, plan.output_dir)
        suffix = shared_by_rank_zero(gather, claim_report_suffix(output_dir) if rank == 0 else None)
        try:
            rows, grids, loaded = evaluate_models(plan, prompt_set, device, rank=rank, world_size=world_size,
                                                  gather=gather,
                                                  image_dir=output_dir / f"images{suffix}" if plan.save_images else None)
            if rank != 0:
                return {}, {}
            notes = run_notes(plan, loaded, prompt_set, world_size, device) + metric_notes(plan, rows)
            columns = report_columns([slot.cls for slot in plan.metrics])
            if len(loaded) > 1:
                columns = (MODEL_COLUMN, *columns)
            title = " vs ".join(f"{model.label or model.path.resolve().parent.name} ({model_hash})"
                                for model, model_hash in loaded)
            paths = write_report(output_dir, rows, grids, title=f"ldmkit sampler evaluation: {title}",
                                 prompts=prompt_set.prompts[: plan.grid_size], notes=notes, suffix=suffix,
                                 columns=columns)
        except BaseException:
            if rank == 0:  # no report is left half there: the claimed, still empty, assets folder goes too
                release_report_suffix(output_dir, suffix)
            raise
        paths["metrics"] = write_metrics_json(output_dir, rows, notes, suffix)
        log_to_loggers(cfg, rows, grids)
        log.info("Report: %s and %s", paths["markdown"], paths["html"])
        return scalar_metrics(rows), {"rows": rows, "grids": grids, "report": paths, "notes": notes}
