"""Mean and 95% interval over seeds for the comparison report (``eval/report.py``).

The statistics are :func:`avts_dist.stats.t_interval`'s; this adapter keeps the report's small
interface: non-finite values (a failed run's NaN) are dropped, and fewer than two values give
``half_width`` None (no spread to estimate) instead of NaN bounds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from avts_dist.stats import t_interval

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
    """``mean +- t_{(1+c)/2, n-1} * s / sqrt(n)`` of the finite ``values`` (``s``: ddof 1)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        raise ValueError("mean_ci needs at least one finite value")
    ci = t_interval(xs, confidence)
    return Interval(ci.mean, ci.half_width if ci.n >= 2 else None, ci.n)
