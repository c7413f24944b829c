"""CMMD (Jayasumana et al. 2024): MMD^2 with a Gaussian RBF kernel (sigma 10, x1000) between the L2-normalised
CLIP image embeddings of the samples and of the split's first N real images. Any CLIP: by default the LDM's
own text-encoder CLIP; the paper's numbers use ViT-L-14-336 (clip=<checkpoint> clip_arch=ViT-L-14-336)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ldmkit.eval.metrics.base import Column, EvalContext, Metric, Row, SampledBatch, fmt
from ldmkit.eval.metrics.clip_score import resolve_clip
from ldmkit.eval.metrics.feature_reference import FeatureReference, check_feature_metric, describe, shared_clip


class CMMD(Metric):
    name = "cmmd"
    row = {"cmmd": None}
    columns = (Column("CMMD ↓", lambda r: fmt(r.get("cmmd"), ".3f"), key="cmmd", best="min", spec=".3f"),)
    needs_real_images = True

    def __init__(self, clip: str | None = None, clip_arch: str | None = None, sigma: float = 10.0,
                 scale: float = 1000.0):
        self.clip, self.clip_arch, self.sigma, self.scale = clip, clip_arch, float(sigma), float(scale)
        self.source: tuple[str, str | None, str] | None = None
        self.reference: FeatureReference | None = None
        self.image_size: tuple[int, int] | None = None

    @classmethod
    def switched_on(cls, root: Mapping[str, Any]) -> CMMD:
        return cls(clip=root.get("clip"), clip_arch=root.get("clip_arch"))

    def check(self, context: EvalContext) -> bool:
        check_feature_metric(context, self.name, 2)
        self.source = resolve_clip(self.clip, self.clip_arch, context.ldm_config)
        return True

    def setup(self, context: EvalContext) -> None:
        path, arch, _ = self.source
        self.reference = FeatureReference.shared(context, shared_clip(context, path, arch))
        self.image_size = (context.height, context.width)

    def update(self, batch: SampledBatch) -> np.ndarray:
        return batch.features(self.reference.extractor)  # (B, D) unit-norm

    def merge(self, partials: Sequence[np.ndarray]) -> dict[str, Any]:
        from ldmkit.eval.distribution import cmmd

        generated = self.reference.generated(partials, self.image_size)
        return {"cmmd": cmmd(self.reference.real, generated, self.sigma, self.scale)}

    def note(self, context: EvalContext, rows: Sequence[Row]) -> str:
        return (f"CMMD: sigma {self.sigma:g}, x{self.scale:g}, against the first {self.reference.real.num_samples} "
                f"real images of the '{context.split}' split with {self.source[2]}; "
                f"{describe(self.reference.extractor)}.")
