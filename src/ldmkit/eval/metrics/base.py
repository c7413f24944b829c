"""The metric contract of `python eval.py` (task=sampled_sets).

A metric is one class, configured by one file in `conf/metrics/` (`_target_` + options), that
- `check(context)`s the config before any weight is read (False: n/a for this run, e.g. no judge for this data),
- `setup(context)`s what it scores with (networks, cached reference statistics; rank 0 runs it first),
- `update(batch)`s: scores one batch of samples into a small picklable partial result,
- `merge(partials)`s the partials of every batch of a setting, in global batch order, into row fields
  (so N processes give bit for bit the numbers of one),
- declares its report `columns` and the fields (`row`) it fills, and writes a `note` on how it was measured.

A metric that brings its own prompts (a prompt suite, e.g. `compositional`) returns them from `own_prompts`:
they are drawn with every setting after the run's prompt set and scored by that metric alone (the others
never see them), with report grids of the sample groups it names.

Features that several metrics share (e.g. Inception features for FID and KID) are computed once per
batch through `SampledBatch.features(extractor)`; shared networks and references through
`EvalContext.shared(key, build)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

Row = Mapping[str, Any]


# --- report cells ---------------------------------------------------------------------------


def missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def fmt(value: Any, spec: str) -> str:
    if missing(value):
        return "n/a"
    try:
        return format(int(value) if spec == "d" else float(value), spec)
    except (TypeError, ValueError):
        return str(value)


def pct(value: float | None) -> str:
    return "n/a" if missing(value) else f"{100 * value:.1f}%"


@dataclass(frozen=True)
class Column:
    """One report column: its header and cell text; `best` ("min"/"max") bolds the best value, compared as
    text formatted with `spec`. The value is `row[key]`, or `value(row)` for one that is not a row field
    (e.g. nested); `interval(row)` gives its (low, high) confidence interval where the metric has one.
    Every column with a value is plotted against NFE (`ldmkit.eval.plots`)."""

    header: str
    cell: Callable[[Row], str]
    key: str | None = None
    best: str | None = None
    spec: str = ".2f"
    value: Callable[[Row], Any] | None = None
    interval: Callable[[Row], tuple[float, float] | None] | None = None

    @property
    def numeric(self) -> bool:
        return self.key is not None or self.value is not None

    def number(self, row: Row) -> float | None:
        """The column's value in `row` as a float, None when n/a."""
        value = self.value(row) if self.value is not None else (row.get(self.key) if self.key else None)
        if missing(value) or isinstance(value, bool):
            return None
        try:
            return float(value)
        except (TypeError, ValueError):
            return None


# --- what metrics see ----------------------------------------------------------------------


@dataclass
class EvalContext:
    """The checked facts of a sampled-sets run a metric may read (built once by `ldmkit.eval.plan`)."""

    ldm_config: dict[str, Any]
    datamodule: Any | None  # None when prompts come from a file and no metric needs real images
    split: str
    file_prompts: list[str] | None
    num_samples: int
    height: int
    width: int
    cache_dir: Path
    data_identity: str  # data config hash: reference statistics are only reusable for the same data
    enabled: frozenset[str] = frozenset()  # names of the metrics switched on in the config
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _shared: dict[Hashable, Any] = field(default_factory=dict, repr=False)

    def shared(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """One object per key for every metric of the run (e.g. the Inception network and reference)."""
        if key not in self._shared:
            self._shared[key] = build()
        return self._shared[key]

    @property
    def data_name(self) -> str:
        return getattr(self.datamodule, "name", "data")


@dataclass
class SampledBatch:
    """One global batch of samples: sample indices, images (B, 3, H, W) in [-1, 1], their prompts and
    targets (the data's attributes, or None)."""

    indices: Sequence[int]
    images: Tensor
    prompts: list[str]
    targets: list[dict | None]
    _features: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def features(self, extractor: Callable[[Tensor], Tensor]) -> np.ndarray:
        """(B, D) float32 features of uint8-quantised images, computed once per extractor."""
        key = id(extractor)
        if key not in self._features:
            from ldmkit.eval.fid import to_uint8_images

            with torch.no_grad():
                self._features[key] = extractor(to_uint8_images(self.images)).float().cpu().numpy()
        return self._features[key]


@dataclass
class OwnPrompts:
    """A metric's own prompts: sample k is `prompts[k]` from `seeds[k]` with `targets[k]`; `grids` maps a
    label to the samples (indices into `prompts`) shown side by side for every setting in the report."""

    prompts: list[str]
    seeds: list[int]
    targets: list[dict | None]
    source: str = ""
    grids: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not len(self.prompts) == len(self.seeds) == len(self.targets):
            raise ValueError(f"{len(self.prompts)} prompts, {len(self.seeds)} seeds, {len(self.targets)} targets")


# --- the contract ---------------------------------------------------------------------------


class Metric:
    """Base of every metric; see the module docstring. Subclasses set the class attributes."""

    name: ClassVar[str]  # key under `metrics:` (conf/metrics/<name>.yaml)
    row: ClassVar[dict[str, Any]]  # the row fields this metric fills, with their n/a values
    columns: ClassVar[tuple[Column, ...]] = ()
    needs_real_images: ClassVar[bool] = False  # the data's real images of the split (FID-like metrics)

    @classmethod
    def switched_on(cls, root: Mapping[str, Any]) -> Metric:
        """The metric for `metrics.<name>=true` (its config node replaced): its defaults, with the options
        it shares with the whole eval config (`root`, e.g. inception_path)."""
        return cls()

    @classmethod
    def off_note(cls) -> str | None:
        """The report's note when the metric is off (None: nothing to say)."""
        return None

    def check(self, context: EvalContext) -> bool:
        """Cheap checks before anything is loaded; raise EvalConfigError with the fix, or return False
        when the metric does not apply to this run."""
        return True

    def own_prompts(self, context: EvalContext) -> OwnPrompts | None:
        """Prompts this metric draws for itself and alone scores (None: it scores the run's prompt set)."""
        return None

    def setup(self, context: EvalContext) -> None:
        """Load what scores (on `context.device`); runs on rank 0 first, so caches are filled once."""

    def update(self, batch: SampledBatch) -> Any:
        """This batch's partial result: small and picklable (gathered across processes)."""
        raise NotImplementedError

    def merge(self, partials: Sequence[Any]) -> dict[str, Any]:
        """Row fields from the partials of every batch of one setting, in global batch order."""
        raise NotImplementedError

    def note(self, context: EvalContext, rows: Sequence[Row]) -> str | None:
        """How the numbers were measured, for the report."""
        return None
