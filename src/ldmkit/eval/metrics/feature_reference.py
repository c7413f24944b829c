"""What the feature-space metrics (fd_dinov2, cmmd, prdc) share: their networks (one per weights file,
shared through `EvalContext.shared`), the real images' features of the split (computed once, cached in
`cache_dir/features` as a safetensors FeatureSet that records the network, weights and preprocessing),
and the checks that fail before sampling."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ldmkit.eval.errors import EvalConfigError
from ldmkit.eval.features.common import FeatureMismatchError, FeatureSet, check_comparable
from ldmkit.eval.metrics.base import EvalContext


def check_feature_metric(context: EvalContext, metric: str, minimum: int) -> None:
    """The real images and the samples must share one resolution and hold `minimum` images each."""
    dm = context.datamodule
    if dm is None:
        raise EvalConfigError(f"{metric} compares samples with the split's real images; this run has no data "
                              f"config with images. Set data=..., or metrics.{metric}=false.")
    resolution = int(getattr(dm, "resolution", context.height))
    if (context.height, context.width) != (resolution, resolution):
        raise EvalConfigError(
            f"{metric}: samples are {context.height}x{context.width} but the real images are {resolution}x{resolution}; "
            f"feature sets are compared at one resolution: drop height=/width= (sample at the data's resolution), "
            f"or metrics.{metric}=false.")
    if context.num_samples < minimum:
        raise EvalConfigError(f"{metric} needs at least {minimum} images per set, num_samples={context.num_samples}; "
                              f"raise num_samples (thousands for a stable number) or metrics.{metric}=false.")


def dinov2_weights(explicit: Any, metric: str) -> Path:
    from ldmkit.eval.features.dinov2 import DINOv2WeightsNotFoundError, resolve_dinov2_weights

    if explicit and not Path(str(explicit)).expanduser().exists():
        raise EvalConfigError(f"metrics.{metric}.weights='{explicit}' does not exist: give Meta's "
                              "dinov2_vitl14_pretrain.pth or a facebook/dinov2-large snapshot folder, "
                              f"or metrics.{metric}=false.")
    try:
        return resolve_dinov2_weights(explicit or None)
    except DINOv2WeightsNotFoundError as err:
        raise EvalConfigError(f"{err}\n(here: metrics.{metric}.weights=PATH) Or run without it: "
                              f"metrics.{metric}=false.") from err


def shared_dinov2(context: EvalContext, weights: Path) -> Any:
    from ldmkit.eval.features.dinov2 import DINOv2FeatureExtractor

    return context.shared(("dinov2", str(weights)), lambda: DINOv2FeatureExtractor(weights, device=context.device))


def shared_clip(context: EvalContext, path: str, arch: str | None) -> Any:
    from ldmkit.eval.features.clip import CLIPImageFeatureExtractor

    return context.shared(("clip-image", path, arch),
                          lambda: CLIPImageFeatureExtractor(path, model_name=arch, device=context.device))


@dataclass
class FeatureReference:
    """A feature extractor and the features of the split's first `num_samples` real images."""

    extractor: Any
    real: FeatureSet
    cache_file: Path

    @classmethod
    def build(cls, extractor: Any, context: EvalContext) -> FeatureReference:
        dm = context.datamodule
        fields = {"identity": extractor.identity, "data": context.data_identity, "split": context.split,
                  "resolution": int(dm.resolution), "num_samples": context.num_samples}
        key = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]
        path = context.cache_dir / "features" / f"ref-{context.split}-{int(dm.resolution)}px-{key}.safetensors"
        if path.is_file():
            size = (int(dm.resolution), int(dm.resolution))
            return cls(extractor, load_cached_features(path, extractor.identity, context.num_samples, size), path)
        real = FeatureSet.of(extractor)
        for batch in dm.dataloader(context.split):
            images = batch["image"][: context.num_samples - real.num_samples]
            if len(images):
                real.update(images)
            if real.num_samples >= context.num_samples:
                break
        if real.num_samples < context.num_samples:
            raise EvalConfigError(f"the '{context.split}' split has only {real.num_samples} real images, "
                                  f"num_samples={context.num_samples}; lower num_samples.")
        real.save(path)
        return cls(extractor, real, path)

    @staticmethod
    def shared(context: EvalContext, extractor: Any) -> FeatureReference:
        return context.shared(("feature-reference", id(extractor)), lambda: FeatureReference.build(extractor, context))

    def generated(self, partials: Sequence[np.ndarray], image_size: tuple[int, int]) -> FeatureSet:
        """The samples' FeatureSet from per-batch features, in global batch order."""
        generated = FeatureSet(self.extractor.identity)
        for features in partials:
            generated.update_features(features, image_size)
        return generated


def load_cached_features(path: Path, identity: dict[str, Any], count: int, image_size: tuple[int, int]) -> FeatureSet:
    """The cached real-image features at `path`, checked before any sample is drawn: readable, made by this
    network, weights and preprocessing, from `count` images of `image_size`; else an error with the fix."""
    fix = "delete that file (ldmkit recomputes it from the real images on the next run)"
    try:
        cached = FeatureSet.load(path)
    except Exception as err:  # safetensors errors, JSON errors, a file that is not ours
        raise EvalConfigError(f"the cached real-image features {path} cannot be read ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}); {fix}.") from err
    expected = FeatureSet(identity)
    expected.image_size = tuple(image_size)
    try:
        check_comparable(cached, expected, "use")
    except FeatureMismatchError as err:
        raise EvalConfigError(f"the cached real-image features {path} were made differently from this run's: "
                              f"{err}. They are not compared; {fix}.") from err
    if cached.num_samples != count:
        raise EvalConfigError(f"the cached real-image features {path} hold {cached.num_samples} images, this run "
                              f"compares {count}; {fix}.")
    return cached


def describe(extractor: Any) -> str:
    """One line of the report: network, weights digest (and whether they are the official file, where the
    extractor checked) and preprocessing."""
    identity = extractor.identity
    pre = identity.get("preprocessing", {})
    steps = "; ".join(f"{k} {v}" for k, v in pre.items() if k != "reference")
    checked = getattr(extractor, "provenance", None)
    weights = f"weights: {checked}" if checked else f"weights sha256 {identity.get('weights')}"
    return f"{identity.get('network')}, {weights}; preprocessing ({pre.get('reference')}): {steps}"


