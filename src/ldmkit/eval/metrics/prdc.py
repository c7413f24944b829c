"""Precision / recall (Kynkaanniemi et al. 2019, k-NN manifolds, k = 3) and density / coverage (Naeem et al.
2020, k = 5) of the samples against the split's first N real images, on DINOv2 features (as Stein et al.
2023 recommend; the network FD-DINOv2 uses, computed once) or CLIP image embeddings."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ldmkit.eval.errors import EvalConfigError
from ldmkit.eval.metrics.base import Column, EvalContext, Metric, Row, SampledBatch, fmt
from ldmkit.eval.metrics.clip_score import resolve_clip
from ldmkit.eval.metrics.feature_reference import (FeatureReference, check_feature_metric, describe, dinov2_weights,
                                                   shared_clip, shared_dinov2)

FEATURES = ("dinov2", "clip")


def _column(key: str, header: str) -> Column:
    return Column(f"{header} ↑", lambda r: fmt(r.get(key), ".3f"), key=key, best="max", spec=".3f")


class PRDC(Metric):
    name = "prdc"
    row = {"precision": None, "recall": None, "density": None, "coverage": None}
    columns = tuple(_column(key, key.capitalize()) for key in row)
    needs_real_images = True

    def __init__(self, features: str = "dinov2", k_precision_recall: int = 3, k_density_coverage: int = 5,
                 weights: str | None = None, clip_arch: str | None = None):
        self.features, self.weights_option, self.clip_arch = str(features), weights, clip_arch
        self.k_pr, self.k_dc = int(k_precision_recall), int(k_density_coverage)
        self.source: Any = None
        self.reference: FeatureReference | None = None
        self.image_size: tuple[int, int] | None = None

    @classmethod
    def switched_on(cls, root: Mapping[str, Any]) -> PRDC:
        return cls()

    def check(self, context: EvalContext) -> bool:
        if self.features not in FEATURES:
            raise EvalConfigError(f"metrics.prdc.features={self.features!r}: use one of {', '.join(FEATURES)}.")
        if min(self.k_pr, self.k_dc) < 1:
            raise EvalConfigError(f"metrics.prdc: k must be >= 1, got k_precision_recall={self.k_pr}, "
                                  f"k_density_coverage={self.k_dc}.")
        k = max(self.k_pr, self.k_dc)
        check_feature_metric(context, self.name, k + 1)  # each image's k-th nearest other image
        if self.features == "dinov2":
            self.source = dinov2_weights(self.weights_option, self.name)
        else:
            self.source = resolve_clip(self.weights_option, self.clip_arch, context.ldm_config)
        return True

    def setup(self, context: EvalContext) -> None:
        if self.features == "dinov2":
            extractor = shared_dinov2(context, self.source)
        else:
            extractor = shared_clip(context, self.source[0], self.source[1])
        self.reference = FeatureReference.shared(context, extractor)
        self.image_size = (context.height, context.width)

    def update(self, batch: SampledBatch) -> np.ndarray:
        return batch.features(self.reference.extractor)  # (B, D)

    def merge(self, partials: Sequence[np.ndarray]) -> dict[str, Any]:
        from ldmkit.eval.distribution import density_coverage, precision_recall

        generated = self.reference.generated(partials, self.image_size)
        return {**precision_recall(self.reference.real, generated, self.k_pr),
                **density_coverage(self.reference.real, generated, self.k_dc)}

    def note(self, context: EvalContext, rows: Sequence[Row]) -> str:
        return (f"Precision/recall (k={self.k_pr}) and density/coverage (k={self.k_dc}): against the first "
                f"{self.reference.real.num_samples} real images of the '{context.split}' split; "
                f"{describe(self.reference.extractor)}.")
