"""KID (Binkowski et al. 2018, sec. 3: unbiased MMD^2 with the cubic kernel) on the Inception features
FID uses, over random subsets as torch-fidelity draws them. On exactly when FID is: it shares FID's
network and reference (metrics.kid=false turns it off alone)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ldmkit.eval.metrics.base import Column, EvalContext, Metric, Row, SampledBatch, missing
from ldmkit.eval.metrics.fid import InceptionReference, resolve_inception


def kid_cell(row: Row) -> str:
    mean, std = row.get("kid_mean"), row.get("kid_std")
    if missing(mean):
        return "n/a"
    return f"{mean:.4f}" + ("" if missing(std) else f" ± {std:.4f}")


class KID(Metric):
    name = "kid"
    row = {"kid_mean": None, "kid_std": None}
    columns = (Column("KID ↓", kid_cell, key="kid_mean", best="min", spec=".4f"),)
    needs_real_images = True

    def __init__(self, subsets: int = 100, subset_size: int = 1000, inception_path: str | None = None):
        self.subsets, self.subset_size, self.inception_path = int(subsets), int(subset_size), inception_path
        self.reference: InceptionReference | None = None

    @classmethod
    def switched_on(cls, root: Mapping[str, Any]) -> KID:
        return cls(inception_path=root.get("inception_path"))

    def check(self, context: EvalContext) -> bool:
        if "fid" not in context.enabled:
            return False
        self.weights = resolve_inception(self.inception_path)
        context.shared(("metric", "kid"), lambda: self)  # FID's note names the subset size
        return True

    def setup(self, context: EvalContext) -> None:
        self.reference = InceptionReference.shared(context, self.weights)

    def update(self, batch: SampledBatch) -> np.ndarray:
        return batch.features(self.reference.extractor)  # (B, 2048), shared with FID's partial

    def merge(self, partials: Sequence[np.ndarray]) -> dict[str, Any]:
        from ldmkit.eval.fid import kernel_inception_distance

        features = np.concatenate(partials) if partials else np.zeros((0, 2048), np.float32)
        reference = self.reference.stats.features
        size = min(self.subset_size, len(features), len(reference))
        mean, std = kernel_inception_distance(features, reference, self.subsets, size)
        return {"kid_mean": mean, "kid_std": std}

    def note(self, context: EvalContext, rows: Sequence[Row]) -> None:
        return None  # FID's note covers both: same images, same network
