"""CLIP score (Hessel et al. 2021): 100 * max(cos(image, prompt), 0), averaged over the samples; by
default with the LDM's own text-encoder CLIP artifact, or any clip artifact / open_clip checkpoint."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ldmkit.artifacts import ArtifactError, read_artifact_config
from ldmkit.eval.errors import EvalConfigError
from ldmkit.eval.metrics.base import Column, EvalContext, Metric, Row, SampledBatch, fmt


def _refuse_placeholder_image_tower(clip_config: Mapping[str, Any], path: Path, what: str) -> None:
    """A text-only CLIP artifact (imported from Stable Diffusion: `image_tower` records a placeholder of zeros)
    embeds every image as 0, so its CLIP score would read 0.00 for any sample: refuse it before sampling."""
    tower = clip_config.get("image_tower")
    if isinstance(tower, str) and tower.startswith("placeholder"):
        raise EvalConfigError(
            f"CLIP score needs an image tower, but {what} '{path}' has none: its image tower is a {tower}, so every "
            "score would read 0.00. Pass clip=PATH (a clip artifact with an image tower, or an open_clip checkpoint "
            "file with clip_arch=<architecture>), or turn CLIP score off: metrics.clip_score=false."
        )


def resolve_clip(explicit: Any, arch: Any, ldm_config: dict[str, Any]) -> tuple[str, str | None, str]:
    """(path, open_clip arch or None, description) of the CLIP model that scores."""
    if explicit:
        path = Path(str(explicit)).expanduser()
        if path.is_dir():
            try:
                clip_config = read_artifact_config(path, "clip")
            except ArtifactError as err:
                raise EvalConfigError(f"clip='{explicit}': {err} Or turn CLIP score off: metrics.clip_score=false.") from err
            _refuse_placeholder_image_tower(clip_config, path, "the clip artifact")
            name = clip_config.get("model_name") or "custom open_clip config"
            return str(path.resolve()), None, f"clip artifact {path.resolve()} ({name})"
        if not path.is_file():
            raise EvalConfigError(f"clip='{explicit}' does not exist; pass a clip artifact folder or an open_clip "
                                  "checkpoint file (with clip_arch=ViT-B-32 or similar).")
        if not arch:
            raise EvalConfigError(f"clip='{explicit}' is an open_clip checkpoint file: also pass its architecture, "
                                  "e.g. clip_arch=ViT-B-32.")
        return str(path.resolve()), str(arch), f"open_clip {arch} from {path.resolve()}"
    text_encoder = Path(ldm_config["text_encoder"])
    options = ldm_config.get("text_encoder_options") or {}
    if text_encoder.is_dir():
        try:
            clip_config = read_artifact_config(text_encoder, "clip")
        except ArtifactError:
            clip_config = None
        if clip_config is not None:
            _refuse_placeholder_image_tower(clip_config, text_encoder, "the LDM's own text encoder")
            name = clip_config.get("model_name") or "custom open_clip config"
            return str(text_encoder), None, f"clip artifact {text_encoder} ({name}; the LDM's own text encoder)"
    elif text_encoder.is_file() and options.get("model_name"):
        arch = str(options["model_name"])
        return str(text_encoder), arch, f"open_clip {arch} from {text_encoder} (the LDM's own text encoder)"
    raise EvalConfigError(
        f"CLIP score needs a CLIP model and the LDM's text encoder '{text_encoder}' is not one this can load. "
        "Pass clip=<clip artifact folder> (or clip=<open_clip checkpoint> clip_arch=<architecture>), "
        "or turn CLIP score off: metrics.clip_score=false."
    )


class CLIPScoreMetric(Metric):
    name = "clip_score"
    row = {"clip_score": None, "clip_model": None}
    columns = (Column("CLIP score ↑", lambda r: fmt(r.get("clip_score"), ".2f"), key="clip_score", best="max",
                      spec=".2f"),)

    def __init__(self, clip: str | None = None, clip_arch: str | None = None):
        self.clip, self.clip_arch = clip, clip_arch
        self.source: tuple[str, str | None, str] | None = None
        self.scorer = None

    @classmethod
    def switched_on(cls, root: Mapping[str, Any]) -> CLIPScoreMetric:
        return cls(clip=root.get("clip"), clip_arch=root.get("clip_arch"))

    @classmethod
    def off_note(cls) -> str:
        return "CLIP score: n/a (metrics.clip_score=false)."

    def check(self, context: EvalContext) -> bool:
        self.source = resolve_clip(self.clip, self.clip_arch, context.ldm_config)
        return True

    def setup(self, context: EvalContext) -> None:
        from ldmkit.eval.clip_score import CLIPScore
        from ldmkit.nn.clip import load_clip

        path, arch, description = self.source
        model, tokenizer, _ = load_clip(path, device=context.device, model_name=arch)
        self.scorer = CLIPScore.from_open_clip(model, tokenizer, model_name=description)

    def update(self, batch: SampledBatch) -> tuple[float, int]:
        scores = self.scorer.update(batch.images, batch.prompts)  # (B,)
        return float(scores.double().sum()), len(scores)

    def merge(self, partials: Sequence[tuple[float, int]]) -> dict[str, Any]:
        total = 0.0
        for batch_sum, _ in partials:  # as CLIPScore.compute, batch by batch in global order
            total += batch_sum
        count = sum(n for _, n in partials)
        return {"clip_score": total / count if count else None, "clip_model": self.source[2]}

    def note(self, context: EvalContext, rows: Sequence[Row]) -> str:
        return f"CLIP score: 100 * max(cos, 0) with {self.source[2]}."
