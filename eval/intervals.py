"""Mean and 95% confidence interval over seeds (Student's t), for the comparison report.

A stand-in until the project's statistics module (issue 13: t-intervals and bootstrap over
seeds) lands: the report calls only :func:`mean_ci`, so swapping this module for that one is a
one-line change in ``eval/report.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Interval", "mean_ci"]


@dataclass(frozen=True)
class Interval:
    mean: float
    half_width: float | None  # None with fewer than two values (no spread to estimate)
    n: int

    @property
    def low(self) -> float | None:
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        return None if self.half_width is None else self.mean + self.half_width


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """``mean +- t_{(1+c)/2, n-1} * s / sqrt(n)`` of ``values`` (sample std ``s``, ddof 1)."""
    from scipy.stats import t

    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        raise ValueError("mean_ci needs at least one finite value")
    n = len(xs)
    mean = sum(xs) / n
    if n < 2:
        return Interval(mean, None, n)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return Interval(mean, float(t.ppf((1 + confidence) / 2, n - 1)) * std / math.sqrt(n), n)
