"""Training progress as a person reads it: a tqdm bar on a terminal; anywhere else (a log file,
SLURM's output, CI) one short line every ``every_s`` seconds and one at the end::

    step 120/300 (40%) | 2.31 steps/s | ETA 1 min 18 s | loss 0.8123 | data wait 12% | retries 3

tqdm writes every update when its stream is not a terminal (thousands of characters per
line), which is why it is only used on one.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any, TextIO

from tqdm.auto import tqdm

__all__ = ["Progress", "format_duration"]

log = logging.getLogger("avts.progress")


def format_duration(seconds: float | None) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 10 min``; ``unknown`` for None or a non-finite value."""
    if seconds is None or not math.isfinite(seconds):
        return "unknown"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, s = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {s:02d} s"
    hours, m = divmod(minutes, 60)
    return f"{hours} h {m:02d} min"


class Progress:
    """``update()`` after every optimizer step (rank 0); ``close()`` at the end."""

    def __init__(
        self,
        enabled: bool,
        *,
        total: int,
        initial: int,
        every_s: float = 30.0,
        stream: TextIO | None = None,
    ) -> None:
        stream = stream or sys.stderr
        self.total, self.every_s = total, every_s
        self.mode = "off"
        if enabled:
            self.mode = "bar" if _is_terminal(stream) else "lines"
        self._bar = None
        if self.mode == "bar":
            self._bar = tqdm(total=total, initial=initial, desc="train", unit="step", file=stream)
        self._step = initial
        self._last_step, self._last_t = initial, time.monotonic()
        self._rate: float | None = None
        self._fields: dict[str, Any] = {}
        self.num_lines = 0

    def update(self, step: int, fields: dict[str, Any]) -> None:
        """``fields``: ``loss``, ``data_wait`` (fraction), ``retries``, ``tracking`` (a word on
        the tracker when it is not delivering), whichever are known."""
        self._step = step
        self._fields = {k: v for k, v in fields.items() if v is not None}
        if self._bar is not None:
            self._bar.set_postfix_str(self._postfix(), refresh=False)
            self._bar.update(step - self._bar.n)
        elif self.mode == "lines" and time.monotonic() - self._last_t >= self.every_s:
            self._line()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.mode == "lines" and self._step != self._last_step:
            self._line()

    def _postfix(self) -> str:
        f = self._fields
        parts = []
        if "loss" in f:
            parts.append(f"loss {f['loss']:.4f}")
        if "data_wait" in f:
            parts.append(f"data wait {100 * f['data_wait']:.0f}%")
        if f.get("retries"):
            parts.append(f"retries {int(f['retries'])}")
        if f.get("tracking"):
            parts.append(str(f["tracking"]))
        return " | ".join(parts)

    def line(self) -> str:
        pct = f" ({100 * self._step / self.total:.0f}%)" if self.total else ""
        parts = [f"step {self._step}/{self.total}{pct}"]
        if self._rate:
            parts.append(f"{self._rate:.3g} steps/s")
            parts.append(f"ETA {format_duration(max(0, self.total - self._step) / self._rate)}")
        postfix = self._postfix()
        return " | ".join(parts + ([postfix] if postfix else []))

    def _line(self) -> None:
        now = time.monotonic()
        if self._step > self._last_step and now > self._last_t:
            self._rate = (self._step - self._last_step) / (now - self._last_t)
        self._last_step, self._last_t = self._step, now
        log.info("%s", self.line())
        self.num_lines += 1


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
