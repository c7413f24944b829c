"""FID (Heusel et al. 2017, eq. 6) on torch-fidelity's Inception-v3 features, against the first N real
images of the split; the Inception network and reference statistics are shared with KID."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ldmkit.eval.errors import EvalConfigError
from ldmkit.eval.metrics.base import Column, EvalContext, Metric, Row, SampledBatch, fmt


def resolve_inception(explicit: Any) -> Path:
    """The Inception weights file (`inception_path=`, $LDMKIT_INCEPTION_WEIGHTS, the torch hub cache)."""
    from ldmkit.eval.inception import INCEPTION_WEIGHTS_FILENAME, InceptionWeightsNotFoundError, resolve_inception_weights

    if explicit and not Path(str(explicit)).expanduser().is_file():
        raise EvalConfigError(
            f"inception_path='{explicit}' does not exist. Put torch-fidelity's {INCEPTION_WEIGHTS_FILENAME} there, "
            "or drop inception_path to use $LDMKIT_INCEPTION_WEIGHTS / the torch hub cache, "
            "or run without FID/KID: metrics.fid=false."
        )
    try:
        return resolve_inception_weights(explicit or None)
    except InceptionWeightsNotFoundError as err:
        message = str(err).replace("eval.inception_path=", "inception_path=").replace("eval.inception_path", "inception_path")
        raise EvalConfigError(f"{message}\nOr run without FID/KID (their columns become n/a): metrics.fid=false.") from err


@dataclass
class InceptionReference:
    """The Inception network and the real images' statistics (cached in `cache_dir/fid`)."""

    weights: Path
    extractor: Any
    stats: Any  # ldmkit.eval.fid.FeatureStats, features kept (KID needs them)

    @classmethod
    def build(cls, weights: Path, context: EvalContext) -> InceptionReference:
        from ldmkit.eval.inception import InceptionFeatureExtractor
        from ldmkit.eval.reference_stats import reference_stats

        extractor = InceptionFeatureExtractor(weights, device=context.device)
        dm = context.datamodule
        stats = reference_stats(
            (batch["image"] for batch in dm.dataloader(context.split)), extractor, context.cache_dir / "fid",
            dataset=context.data_identity, split=context.split, resolution=int(dm.resolution),
            max_images=context.num_samples,
        )
        if stats.num_samples < context.num_samples:
            raise EvalConfigError(f"the '{context.split}' split has only {stats.num_samples} real images for FID/KID, "
                                  f"num_samples={context.num_samples}; lower num_samples.")
        return cls(weights, extractor, stats)

    @staticmethod
    def shared(context: EvalContext, weights: Path) -> InceptionReference:
        return context.shared(("inception", str(weights)), lambda: InceptionReference.build(weights, context))


class FID(Metric):
    name = "fid"
    row = {"fid": None}
    columns = (Column("FID ↓", lambda r: fmt(r.get("fid"), ".2f"), key="fid", best="min", spec=".2f"),)
    needs_real_images = True

    def __init__(self, inception_path: str | None = None):
        self.inception_path = inception_path
        self.weights: Path | None = None
        self.reference: InceptionReference | None = None

    @classmethod
    def switched_on(cls, root: Mapping[str, Any]) -> FID:
        return cls(inception_path=root.get("inception_path"))

    @classmethod
    def off_note(cls) -> str:
        return "FID/KID: n/a (metrics.fid=false)."

    def check(self, context: EvalContext) -> bool:
        self.weights = resolve_inception(self.inception_path)
        if context.num_samples < 2:
            raise EvalConfigError("FID needs num_samples >= 2 (a covariance); raise num_samples or set metrics.fid=false.")
        return True

    def setup(self, context: EvalContext) -> None:
        self.reference = InceptionReference.shared(context, self.weights)

    def update(self, batch: SampledBatch) -> np.ndarray:
        return batch.features(self.reference.extractor)  # (B, 2048)

    def merge(self, partials: Sequence[np.ndarray]) -> dict[str, Any]:
        from ldmkit.eval.fid import FeatureStats

        stats = FeatureStats(keep_features=False)
        for features in partials:  # global batch order: the same float sums as one process
            stats.update_features(features)
        return {"fid": stats.compute_fid(self.reference.stats)}

    def note(self, context: EvalContext, rows: Sequence[Row]) -> str:
        kid = context.shared(("metric", "kid"), lambda: None)
        subset = getattr(kid, "subset_size", 1000)
        dm = context.datamodule
        return (f"FID/KID: against the first {self.reference.stats.num_samples} real images of the '{context.split}' "
                f"split ({context.data_name}, {dm.resolution}px), torch-fidelity Inception-v3 ({self.weights.name}); "
                f"KID subset size min({subset}, N).")
