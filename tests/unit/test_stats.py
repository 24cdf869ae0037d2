"""Confidence intervals against hand-computed cases (t quantiles from printed tables)."""

from __future__ import annotations

import math

import pytest

from avts_dist.stats import (
    balanced_accuracy_interval,
    bootstrap_interval,
    paired_t_interval,
    t_interval,
)


def test_t_interval_matches_a_hand_computed_case():
    # Three seeds: mean 0.74, s = 0.04, s/sqrt(3) = 0.0230940, t(0.975, 2) = 4.303 (table).
    ci = t_interval([0.70, 0.74, 0.78])
    assert ci.mean == pytest.approx(0.74)
    assert ci.half_width == pytest.approx(4.303 * 0.04 / math.sqrt(3), abs=1e-4)
    assert (ci.low, ci.high) == pytest.approx((0.74 - 0.099368, 0.74 + 0.099368), abs=1e-5)
    assert ci.n == 3 and ci.method == "t" and str(ci) == "0.740 ± 0.099 (n=3)"
    # Five values 1..5: s = sqrt(2.5), t(0.975, 4) = 2.776 (table).
    five = t_interval([1, 2, 3, 4, 5])
    assert five.half_width == pytest.approx(2.776 * math.sqrt(2.5) / math.sqrt(5), abs=1e-3)
    # A 90% interval is narrower: t(0.95, 4) = 2.132 (table).
    ninety = t_interval([1, 2, 3, 4, 5], confidence=0.90)
    assert ninety.half_width == pytest.approx(2.132 * math.sqrt(0.5), abs=1e-3)


def test_paired_interval_is_the_interval_of_the_differences():
    # Differences 0.2, 0.1, 0.3: mean 0.2, s = 0.1, t(0.975, 2) = 4.303.
    ci = paired_t_interval([0.8, 0.7, 0.9], [0.6, 0.6, 0.6])
    assert ci.mean == pytest.approx(0.2)
    assert ci.half_width == pytest.approx(4.303 * 0.1 / math.sqrt(3), abs=1e-4)
    assert ci.method == "paired t"
    with pytest.raises(ValueError, match="3 values against 2"):
        paired_t_interval([1, 2, 3], [1, 2])


def test_bootstrap_interval_matches_the_enumerated_distribution():
    # Two values 0 and 1: resampled means are 0, 0.5, 1 with probability 1/4, 1/2, 1/4, so the
    # 2.5% and 97.5% quantiles are 0 and 1.
    ci = bootstrap_interval([0.0, 1.0], num_resamples=4000, seed=1)
    assert (ci.mean, ci.low, ci.high) == (0.5, 0.0, 1.0)
    # The 30% and 70% quantiles both sit on 0.5, which holds the middle half of the mass.
    narrow = bootstrap_interval([0.0, 1.0], confidence=0.4, num_resamples=4000, seed=1)
    assert (narrow.low, narrow.high) == (0.5, 0.5)
    assert bootstrap_interval([0.3] * 5).half_width == 0.0
    again = bootstrap_interval([0.1, 0.5, 0.2, 0.9], seed=3)
    assert again == bootstrap_interval([0.1, 0.5, 0.2, 0.9], seed=3)


def test_degenerate_and_bad_inputs():
    one = t_interval([0.5])
    assert one.mean == 0.5 and one.low is None and str(one) == "0.500 (n=1, no interval)"
    assert t_interval([0.4, 0.4, 0.4]).half_width == pytest.approx(0.0, abs=1e-12)
    for bad, message in (([], "no values"), ([0.1, math.nan], "finite")):
        with pytest.raises(ValueError, match=message):
            t_interval(bad)
    with pytest.raises(ValueError, match="confidence"):
        t_interval([1, 2], confidence=95)
    assert t_interval([1.0, 2.0]).as_dict()["half_width"] == pytest.approx(12.706 * 0.5, abs=1e-3)


def test_balanced_accuracy_interval_by_hand():
    # Hit rate 0.75 over 16 positives, rejection 0.875 over 16 negatives: variance
    # 0.25 * (0.75 * 0.25 / 16 + 0.875 * 0.125 / 16) = 0.0046387, z(0.975) = 1.96 (table).
    ci = balanced_accuracy_interval(0.75, 16, 0.875, 16)
    assert ci.mean == 0.8125 and ci.n == 32 and ci.method == "normal"
    assert ci.half_width == pytest.approx(1.96 * math.sqrt(0.0046387), abs=1e-4)
    # Clipped to [0, 1]; no positives is a clear error.
    top = balanced_accuracy_interval(1.0, 4, 0.9, 4)
    assert top.high == 1.0 and top.low < top.mean
    with pytest.raises(ValueError, match="counts must be > 0"):
        balanced_accuracy_interval(0.5, 0, 0.5, 4)
