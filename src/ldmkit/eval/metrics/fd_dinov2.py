"""FD-DINOv2 (Stein et al. 2023; reported by EDM2): the Frechet distance of DINOv2 ViT-L/14 CLS features
of the samples and of the split's first N real images, preprocessed as dgm-eval does."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ldmkit.eval.metrics.base import Column, EvalContext, Metric, Row, SampledBatch, fmt
from ldmkit.eval.metrics.feature_reference import (FeatureReference, check_feature_metric, describe, dinov2_weights,
                                                   shared_dinov2)


class FDDINOv2(Metric):
    name = "fd_dinov2"
    row = {"fd_dinov2": None}
    columns = (Column("FD-DINOv2 ↓", lambda r: fmt(r.get("fd_dinov2"), ".2f"), key="fd_dinov2", best="min",
                      spec=".2f"),)
    needs_real_images = True

    def __init__(self, weights: str | None = None):
        self.weights_option = weights
        self.weights: Path | None = None
        self.reference: FeatureReference | None = None
        self.image_size: tuple[int, int] | None = None

    @classmethod
    def switched_on(cls, root: Mapping[str, Any]) -> FDDINOv2:
        return cls()

    def check(self, context: EvalContext) -> bool:
        check_feature_metric(context, self.name, 2)
        self.weights = dinov2_weights(self.weights_option, self.name)
        return True

    def setup(self, context: EvalContext) -> None:
        self.reference = FeatureReference.shared(context, shared_dinov2(context, self.weights))
        self.image_size = (context.height, context.width)

    def update(self, batch: SampledBatch) -> np.ndarray:
        return batch.features(self.reference.extractor)  # (B, 1024), shared with prdc on DINOv2

    def merge(self, partials: Sequence[np.ndarray]) -> dict[str, Any]:
        from ldmkit.eval.distribution import frechet_feature_distance

        generated = self.reference.generated(partials, self.image_size)
        return {"fd_dinov2": frechet_feature_distance(self.reference.real, generated, "FD-DINOv2")}

    def note(self, context: EvalContext, rows: Sequence[Row]) -> str:
        return (f"FD-DINOv2: against the first {self.reference.real.num_samples} real images of the "
                f"'{context.split}' split; {describe(self.reference.extractor)}.")
