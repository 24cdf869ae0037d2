"""Data that is not all there: missing shards at build time, too many failing clips in training.

- :func:`check_shards` lists the shard folders once (one listing per folder, no data read) and
  finds the clips whose shard is absent or shorter than the index says. The loader stops at
  build naming the shards, unless ``data.allow_missing_shards`` (then it warns with the share of
  data lost and leaves those clips out).
- :class:`SkipBudget` counts the clips tried and the ones that failed (by reason);
  :class:`SkippedClipsError` stops training once the failed share passes
  ``data.max_skip_fraction``.
"""

from __future__ import annotations

import logging
import os
from collections import Counter

import numpy as np

from avts_dist.data.index import DatasetError, DatasetIndex
from avts_dist.storage import join

__all__ = ["SkipBudget", "SkippedClipsError", "check_shards"]

log = logging.getLogger("avts.data")

# The failed share is judged once this many clips were tried (one bad clip among the first few
# is not a trend).
MIN_CLIPS_JUDGED = 50


class SkippedClipsError(DatasetError):
    """Too many clips failed at read or decode time; the message counts them by reason."""


def _shard_sizes(index: DatasetIndex, fs) -> dict[str, int]:
    root = fs._strip_protocol(index.url)
    sizes: dict[str, int] = {}
    for folder in sorted({os.path.dirname(name) for name in index.shards}):
        try:
            listing = fs.ls(join(root, folder), detail=True, refresh=True)
        except FileNotFoundError:
            listing = []
        except TypeError:  # filesystems without a listings cache take no refresh
            listing = fs.ls(join(root, folder), detail=True)
        for entry in listing:
            sizes[fs._strip_protocol(entry["name"])] = int(entry.get("size") or 0)
    return {name: sizes.get(fs._strip_protocol(join(root, name)), -1) for name in index.shards}


def check_shards(
    index: DatasetIndex, pool: np.ndarray, fs, *, allow_missing: bool, what: str
) -> tuple[np.ndarray, list[str]]:
    """``pool`` without the clips whose bytes are not in storage, and the damaged shards.

    Raises :class:`DatasetError` naming the shards unless ``allow_missing``; ``what`` names the
    split and URL in messages.
    """
    sizes = _shard_sizes(index, fs)
    size_of = np.array([sizes[name] for name in index.shards], dtype=np.int64)
    j = index.members.index("mp4") if "mp4" in index.members else 0
    end = index.offset[pool, j] + index.size[pool, j]
    lost = end > size_of[index.shard[pool]]
    if not lost.any():
        return pool, []
    damaged = sorted({index.shards[int(s)] for s in index.shard[pool][lost]})
    described = [
        f"{name} ({'missing' if sizes[name] < 0 else f'{sizes[name]} bytes, truncated'})"
        for name in damaged
    ]
    share = lost.mean()
    listed = ", ".join(described[:5]) + (
        f" and {len(described) - 5} more" if len(described) > 5 else ""
    )
    if not allow_missing:
        raise DatasetError(
            f"{what}: {len(damaged)} shard(s) listed in the index are not in storage: {listed}; "
            f"{int(lost.sum())} clips ({share:.1%} of the split) would be lost. Restore them, or "
            "set data.allow_missing_shards=true to train without them"
        )
    log.warning(
        "data: %s: training without %d damaged shard(s) (%s): %d clips, %.1f%% of the split lost",
        what,
        len(damaged),
        listed,
        int(lost.sum()),
        100 * share,
    )
    return pool[~lost], damaged


class SkipBudget:
    """Counts clips tried and failed; :meth:`check` raises past ``max_fraction``."""

    def __init__(self, max_fraction: float) -> None:
        self.max_fraction = float(max_fraction)
        self.tried = 0
        self.failed: Counter = Counter()

    def add(self, delivered: int, reasons: list[str]) -> None:
        self.failed.update(reasons)
        self.tried += delivered + len(reasons)

    @property
    def fraction(self) -> float:
        return sum(self.failed.values()) / self.tried if self.tried else 0.0

    def describe(self) -> str:
        total = sum(self.failed.values())
        reasons = ", ".join(f"{r} {n}" for r, n in self.failed.most_common())
        return f"{total} of {self.tried} clips tried failed ({self.fraction:.1%}): {reasons}"

    def check(self, where: str) -> None:
        if self.tried >= MIN_CLIPS_JUDGED and self.fraction > self.max_fraction:
            raise SkippedClipsError(
                f"{where}: {self.describe()}; above data.max_skip_fraction="
                f"{self.max_fraction:g} (the failing keys are in the warnings above)"
            )
