"""Binomial confidence intervals for the report's accuracies (a rate of k correct out of n trials).

The Wilson score interval (Wilson 1927; recommended over the normal "Wald" interval by Brown, Cai and
DasGupta 2001, "Interval estimation for a binomial proportion") stays inside [0, 1] and keeps close to
its nominal coverage for small n and rates near 0 or 1, which is where a judge's accuracy over a few
dozen prompts lives. It is `scipy.stats.binomtest(k, n).proportion_ci(method="wilson")`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from statistics import NormalDist
from typing import Any

CONFIDENCE = 0.95


def wilson_interval(successes: int, trials: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """(low, high) of the Wilson score interval for `successes` out of `trials`:
    (p + z^2 / 2n ± z sqrt(p (1 - p) / n + z^2 / 4n^2)) / (1 + z^2 / n), z the two-sided normal quantile."""
    k, n = int(successes), int(trials)
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"a binomial interval needs 0 <= successes <= trials and trials >= 1, got {k} of {n}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def counts_of(row: Mapping[str, Any], field: str, key: str) -> tuple[int, int] | None:
    """(correct, trials) stored as `row[field][key] = [correct, trials]`, or None when absent."""
    counts = row.get(field)
    pair = counts.get(key) if isinstance(counts, Mapping) else None
    if not isinstance(pair, Sequence) or len(pair) != 2 or not pair[1]:
        return None
    return int(pair[0]), int(pair[1])


def interval_of(row: Mapping[str, Any], field: str, key: str) -> tuple[float, float] | None:
    counts = counts_of(row, field, key)
    return None if counts is None else wilson_interval(*counts)


def within(interval: tuple[float, float] | None, value: float | None) -> bool:
    """True when `value` lies inside `interval`: the difference is within the sampling uncertainty."""
    return interval is not None and value is not None and interval[0] <= value <= interval[1]
