"""The report's binomial intervals: Wilson's score interval equals SciPy's and its closed form."""

from __future__ import annotations

import math

import pytest
from scipy.stats import binomtest

from ldmkit.eval.intervals import counts_of, interval_of, wilson_interval, within


@pytest.mark.parametrize("k, n", [(0, 1), (1, 1), (0, 68), (68, 68), (33, 68), (61, 68), (7, 10), (1, 1000)])
@pytest.mark.parametrize("confidence", [0.95, 0.8])
def test_wilson_interval_equals_scipy(k, n, confidence):
    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    assert wilson_interval(k, n, confidence) == pytest.approx((ci.low, ci.high), abs=1e-12)


def test_wilson_interval_closed_form_for_half():
    # k = n/2: centred on 1/2, half-width z / (2 sqrt(n + z^2)) (Wilson 1927, p = 1/2)
    z = 1.959963984540054
    low, high = wilson_interval(34, 68)
    assert (low + high) / 2 == pytest.approx(0.5, abs=1e-15)
    assert (high - low) / 2 == pytest.approx(z / (2 * math.sqrt(68 + z * z)), rel=1e-12)


def test_row_counts_and_within():
    row = {"prompt_accuracy_counts": {"both": [61, 68]}}
    assert counts_of(row, "prompt_accuracy_counts", "both") == (61, 68)
    assert counts_of(row, "prompt_accuracy_counts", "colour") is None and interval_of({}, "x", "both") is None
    interval = interval_of(row, "prompt_accuracy_counts", "both")
    assert within(interval, 61 / 68) and not within(interval, 0.5) and not within(None, 0.5)


def test_bad_counts_say_what_was_seen():
    with pytest.raises(ValueError, match=r"got 5 of 4"):
        wilson_interval(5, 4)
    with pytest.raises(ValueError, match=r"got 0 of 0"):
        wilson_interval(0, 0)
