"""Metrics of `python eval.py`, one class each (contract: `ldmkit.eval.metrics.base`), configured by the
`conf/metrics/` group: `metrics.<name>` is the metric's config node (`_target_` + options), `false` to
turn it off (its columns stay, as n/a), `true` for its defaults.

Adding a metric: a module here with one `Metric` subclass, and `conf/metrics/<name>.yaml`.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ldmkit.eval.errors import EvalConfigError
from ldmkit.eval.metrics.base import Column, EvalContext, Metric, OwnPrompts, SampledBatch

__all__ = ["Column", "EvalContext", "Metric", "MetricSlot", "OwnPrompts", "SampledBatch", "build_metrics",
           "metric_classes"]


def metric_classes() -> dict[str, type[Metric]]:
    """Every metric class of this package by name (a new module is found without being listed)."""
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")
    found: dict[str, type[Metric]] = {}
    stack = list(Metric.__subclasses__())
    while stack:
        cls = stack.pop()
        stack += cls.__subclasses__()
        if getattr(cls, "name", None):
            found.setdefault(cls.name, cls)
    return found


@dataclass
class MetricSlot:
    """A configured metric: its class (for columns and n/a fields even when off) and the instance when on."""

    name: str
    cls: type[Metric]
    metric: Metric | None

    @property
    def on(self) -> bool:
        return self.metric is not None


def build_metrics(node: Mapping[str, Any] | None, root: Mapping[str, Any] | None = None) -> list[MetricSlot]:
    """`cfg.metrics` -> slots in config order (constructors only: nothing is loaded); `root` is the whole
    config, for `metrics.<name>=true`."""
    from hydra.utils import instantiate
    from omegaconf import DictConfig

    classes = metric_classes()
    slots = []
    for name, value in (node or {}).items():
        name = str(name)
        if isinstance(value, (DictConfig, dict)) and "_target_" in value:
            metric = instantiate(value, _convert_="all")
            if not isinstance(metric, Metric):
                raise EvalConfigError(f"metrics.{name}: `{value['_target_']}` built a {type(metric).__name__}, "
                                      "not an ldmkit.eval.metrics.Metric.")
            slots.append(MetricSlot(name, type(metric), metric))
            continue
        if name not in classes:
            raise EvalConfigError(f"metrics.{name}={value!r}: no metric is called {name!r}; known: "
                                  f"{', '.join(sorted(classes))} (conf/metrics/).")
        cls = classes[name]
        if value is None or value is False:
            slots.append(MetricSlot(name, cls, None))
        elif value is True:
            slots.append(MetricSlot(name, cls, cls.switched_on(root or {})))
        else:
            raise EvalConfigError(f"metrics.{name}={value!r}: give true, false or its config "
                                  f"(conf/metrics/{name}.yaml).")
    return slots
