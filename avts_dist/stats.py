"""Confidence intervals for results over seeds: what every figure of a study carries.

- :func:`t_interval`: mean and Student-t interval over independent runs (seeds). The default
  for a study's tables: with 3 to 10 seeds the normal interval would be too narrow.
- :func:`paired_t_interval`: the interval of a mean difference over paired runs (the same
  fine-tuning seed from a pretrained and from a random start), narrower than comparing two
  independent intervals when the pairs share their noise.
- :func:`bootstrap_interval`: percentile bootstrap of the mean, for skewed values or a check of
  the t interval; seeded, so a report is reproducible.
- :func:`mean_ci`: :func:`t_interval` of the finite values only (a failed run's NaN dropped), for
  the comparison report's tables and figures.
- :func:`balanced_accuracy_interval`: the normal-approximation interval of the mean of two
  binomial proportions (sync accuracy: the in-sync hit rate and the negative rejection rate).

Every one returns an :class:`Interval`; fewer than two values give no interval (``low``,
``high`` and ``half_width`` None).

scipy comes with MLflow (through scikit-learn); it is used only for the t and normal quantiles.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import norm
from scipy.stats import t as student_t

__all__ = [
    "Interval",
    "balanced_accuracy_interval",
    "bootstrap_interval",
    "mean_ci",
    "paired_t_interval",
    "t_interval",
]


@dataclass(frozen=True)
class Interval:
    """``mean`` with a ``confidence`` interval ``[low, high]`` from ``n`` values; ``low`` and
    ``high`` are None when there is no interval (one value: no spread to estimate)."""

    mean: float
    low: float | None
    high: float | None
    n: int
    confidence: float
    method: str

    @property
    def half_width(self) -> float | None:
        if self.low is None or self.high is None:
            return None
        return (self.high - self.low) / 2

    def as_dict(self) -> dict[str, float | int | str]:
        return {**asdict(self), "half_width": self.half_width}

    def __str__(self) -> str:
        if self.n < 2 or self.half_width is None:
            return f"{self.mean:.3f} (n={self.n}, no interval)"
        return f"{self.mean:.3f} ± {self.half_width:.3f} (n={self.n})"


def _values(values: Sequence[float], what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).ravel()
    if arr.size == 0:
        raise ValueError(f"{what}: no values")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what}: values must be finite, got {arr.tolist()}")
    return arr


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def t_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """``mean ± t_{(1+c)/2, n-1} * s / sqrt(n)`` (s: the sample standard deviation).

    One value has no interval: ``low`` and ``high`` are None and ``str()`` says so.
    """
    _check_confidence(confidence)
    arr = _values(values, "t_interval")
    mean = float(arr.mean())
    if arr.size < 2:
        return Interval(mean, None, None, 1, confidence, "t")
    sem = float(arr.std(ddof=1)) / math.sqrt(arr.size)
    half = float(student_t.ppf((1 + confidence) / 2, df=arr.size - 1)) * sem
    return Interval(mean, mean - half, mean + half, int(arr.size), confidence, "t")


def paired_t_interval(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> Interval:
    """t interval of ``mean(a - b)`` over pairs ``(a[i], b[i])``."""
    a_arr, b_arr = _values(a, "paired_t_interval a"), _values(b, "paired_t_interval b")
    if a_arr.shape != b_arr.shape:
        raise ValueError(f"paired_t_interval: {a_arr.size} values against {b_arr.size}")
    out = t_interval(a_arr - b_arr, confidence)
    return Interval(out.mean, out.low, out.high, out.n, confidence, "paired t")


def bootstrap_interval(
    values: Sequence[float],
    confidence: float = 0.95,
    num_resamples: int = 10_000,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap interval of the mean (resampling values with replacement)."""
    _check_confidence(confidence)
    if num_resamples < 1:
        raise ValueError(f"num_resamples must be >= 1, got {num_resamples}")
    arr = _values(values, "bootstrap_interval")
    rng = np.random.default_rng(seed)
    means = arr[rng.integers(0, arr.size, size=(num_resamples, arr.size))].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return Interval(
        float(arr.mean()), float(low), float(high), int(arr.size), confidence, "bootstrap"
    )


def mean_ci(values: Sequence[float | None], confidence: float = 0.95) -> Interval:
    """:func:`t_interval` of the finite ``values`` (None and NaN, a failed run's, are dropped);
    ValueError when none is left."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite:
        raise ValueError("mean_ci needs at least one finite value")
    return t_interval(finite, confidence)


def balanced_accuracy_interval(
    hit_rate: float, num_pos: float, reject_rate: float, num_neg: float, confidence: float = 0.95
) -> Interval:
    """``(hit_rate + reject_rate) / 2`` with its normal-approximation interval, clipped to
    [0, 1]: the two rates are independent binomial proportions over ``num_pos`` positives and
    ``num_neg`` negatives, so the variance of their mean is the sum of theirs over 4."""
    _check_confidence(confidence)
    if num_pos <= 0 or num_neg <= 0:
        raise ValueError(
            f"balanced_accuracy_interval: counts must be > 0, got {num_pos}, {num_neg}"
        )
    mean = 0.5 * (hit_rate + reject_rate)
    var = 0.25 * (hit_rate * (1 - hit_rate) / num_pos + reject_rate * (1 - reject_rate) / num_neg)
    half = float(norm.ppf((1 + confidence) / 2)) * math.sqrt(var)
    low, high = max(0.0, mean - half), min(1.0, mean + half)
    return Interval(mean, low, high, int(num_pos + num_neg), confidence, "normal")
