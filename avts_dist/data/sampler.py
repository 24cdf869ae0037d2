"""The deterministic global sample order and per-sample random streams.

- The order of epoch ``e`` is a permutation of the sampled rows drawn from ``(seed, e)`` only.
- Global step ``k`` (counted across epochs) covers global positions ``[j*B, (j+1)*B)`` of epoch
  ``k // steps_per_epoch``, with ``j = k % steps_per_epoch`` and ``B`` the global batch size.
  Rank ``r`` of ``w`` takes positions ``[j*B + r*B/w, j*B + (r+1)*B/w)``.
- Every random choice of a sample comes from :func:`sample_rng`, a counter-based generator
  (Philox) keyed by ``(seed, epoch, position, attempt)``: no state carries from one sample to the
  next, so the result does not depend on world size, worker count or what ran before.

Hence the loader's state is just the next global step plus the negative-mix schedule
(:class:`LoaderState`), and it restores at any world size.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "STATE_VERSION",
    "GlobalSampler",
    "LoaderState",
    "MixSchedule",
    "sample_rng",
]

# 2 adds ``order``: what fixes the sample order beyond seed and batch ("random", or the block
# parameters); version 1 states are random-access states.
STATE_VERSION = 2
# Stream tags keep the order's generator apart from the samples' generators.
_ORDER_STREAM = 0x0D0E
_SAMPLE_STREAM = 0x5A3E


def sample_rng(seed: int, epoch: int, position: int, attempt: int = 0) -> np.random.Generator:
    """The generator of one sample (``attempt`` > 0 for a replacement of a failed clip)."""
    ss = np.random.SeedSequence(
        [int(seed), _SAMPLE_STREAM, int(epoch), int(position), int(attempt)]
    )
    return np.random.Generator(np.random.Philox(ss))


class GlobalSampler:
    """Maps global steps to global positions and rows, the same on every rank."""

    def __init__(
        self,
        pool: np.ndarray,
        global_batch_size: int,
        seed: int,
        *,
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> None:
        if len(pool) == 0:
            raise ValueError("no samples to draw from")
        self.pool = np.asarray(pool, dtype=np.int64)
        self.global_batch_size = int(global_batch_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.drop_last = drop_last
        n, b = len(self.pool), self.global_batch_size
        self.steps_per_epoch = n // b if drop_last else math.ceil(n / b)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{n} samples cannot fill one global batch of {b} (drop_last=True)")
        self._order_cache: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.pool)

    def order(self, epoch: int) -> np.ndarray:
        """Rows in the order of ``epoch`` (cached for the latest epoch asked)."""
        if self._order_cache is not None and self._order_cache[0] == epoch:
            return self._order_cache[1]
        if self.shuffle:
            ss = np.random.SeedSequence([self.seed, _ORDER_STREAM, int(epoch)])
            order = self.pool[np.random.Generator(np.random.Philox(ss)).permutation(len(self.pool))]
        else:
            order = self.pool
        self._order_cache = (epoch, order)
        return order

    def epoch_of(self, global_step: int) -> int:
        return global_step // self.steps_per_epoch

    def positions(self, global_step: int, rank: int = 0, world_size: int = 1) -> range:
        """Global positions (within the epoch) of rank ``rank``'s share of ``global_step``."""
        b = self.global_batch_size
        if b % world_size:
            raise ValueError(f"global batch size {b} is not divisible by world size {world_size}")
        local = b // world_size
        base = (global_step % self.steps_per_epoch) * b + rank * local
        return range(base, base + local)

    def row_at(self, epoch: int, position: int) -> int:
        # Past the end (last partial batch without drop_last) wraps to the epoch's start.
        order = self.order(epoch)
        return int(order[position % len(order)])


@dataclass
class MixSchedule:
    """``[(from_step, mix), ...]`` sorted by step: the mix in force at each global step."""

    entries: list[tuple[int, dict[str, float]]] = field(default_factory=list)

    def at(self, step: int) -> dict[str, float]:
        current = self.entries[0][1]
        for from_step, mix in self.entries:
            if from_step <= step:
                current = mix
            else:
                break
        return current

    def set_from(self, step: int, mix: dict[str, float]) -> bool:
        """Records ``mix`` from ``step`` on; returns False when nothing changes."""
        if self.at(step) == mix:
            return False
        self.entries = [(s, m) for s, m in self.entries if s < step] + [(step, dict(mix))]
        return True

    def to_list(self) -> list[list[Any]]:
        return [[int(s), {k: float(v) for k, v in m.items()}] for s, m in self.entries]

    @classmethod
    def from_list(cls, items: list[Any]) -> MixSchedule:
        entries = sorted((int(s), {str(k): float(v) for k, v in dict(m).items()}) for s, m in items)
        if not entries:
            raise ValueError("empty negative-mix schedule")
        return cls(entries)


@dataclass
class LoaderState:
    """The loader's whole resumable state: global, tiny, identical on every rank, JSON-able."""

    global_step: int
    epoch: int
    mix_schedule: list[list[Any]]
    seed: int
    global_batch_size: int
    num_samples: int
    order: str = "random"
    version: int = STATE_VERSION

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoaderState:
        if not isinstance(data, dict):
            raise ValueError(f"loader state must be a dict, got {type(data).__name__}")
        version = data.get("version")
        if version == 1:
            data = {**data, "order": "random", "version": STATE_VERSION}
            version = STATE_VERSION
        if version != STATE_VERSION:
            raise ValueError(f"loader state version {version!r} is not {STATE_VERSION}")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = names - set(data)
        if missing:
            raise ValueError(f"loader state lacks {sorted(missing)}")
        return cls(**{k: data[k] for k in names})
