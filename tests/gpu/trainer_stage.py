"""One rank of ``avts train`` that counts its host syncs per optimizer step, as JSON.

    python -m tests.gpu.trainer_stage --syncs-out syncs.json --count-from 11 \\
        --config configs/pretrain/quickstart.yaml key=value ...

It runs the real ``avts train`` (``train_and_report``, the CLI's own path) and, from optimizer
step ``--count-from`` to the end, counts every host sync with the line of code that made it:

- ``cuda``: ``torch.cuda.set_sync_debug_mode("warn")``, CUDA's own report of each synchronizing
  call (``.item()``, a tensor's truth value, a device-to-host copy, ``nonzero``...);
- ``cpu`` (no GPU): the Tensor methods that read a value on the host (``item``, ``tolist``,
  ``__bool__``, ``__float__``, ``__int__``, ``__index__``, ``numpy``) are wrapped. It sees only
  those calls, not implicit syncs such as boolean-mask indexing, which only the GPU reports.

Counting starts in the ``on_loss`` hook of step ``--count-from`` (before its forward) and stops
in that of step ``--count-to``, so the window holds whole optimizer steps, log steps among them,
and not the run's start or its final save. Each sync is attributed to the line that made it:
``avts_dist/...`` (this project), ``deepspeed/...``, ``torch/...``.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import traceback
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy")
SYNC_WARNING = "called a synchronizing CUDA operation"


def caller(stack: list[traceback.FrameSummary]) -> str:
    """``avts_dist/x.py:LINE func`` or ``package/x.py:LINE func``: the frame that made the call
    (this counter's and the warnings module's frames left out)."""
    for frame in reversed(stack):
        path = Path(frame.filename)
        if path == Path(__file__) or path.name == "warnings.py":
            continue
        parts = path.parts
        for root in ("avts_dist", "site-packages"):
            if root in parts:
                start = parts.index(root) + (root == "site-packages")
                return f"{'/'.join(parts[start:])}:{frame.lineno} {frame.name}"
        return f"{path.name}:{frame.lineno} {frame.name}"
    return "other"


class SyncCounter:
    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.by_caller: collections.Counter[str] = collections.Counter()
        self._undo: list = []

    def _record(self) -> None:
        self.by_caller[caller(traceback.extract_stack()[:-2])] += 1

    def start(self) -> None:
        if self.mode == "cuda":
            warnings.filterwarnings("always", message=f".*{SYNC_WARNING}")
            shown = warnings.showwarning

            def show(message, category, filename, lineno, file=None, line=None):
                if SYNC_WARNING in str(message):
                    self._record()
                else:
                    shown(message, category, filename, lineno, file, line)

            warnings.showwarning = show
            torch.cuda.set_sync_debug_mode("warn")
            self._undo.append(lambda: torch.cuda.set_sync_debug_mode("default"))
            self._undo.append(lambda: setattr(warnings, "showwarning", shown))
            return
        for name in HOST_READS:
            original = getattr(torch.Tensor, name)

            def wrapped(*args, __original=original, **kwargs):
                self._record()
                return __original(*args, **kwargs)

            setattr(torch.Tensor, name, wrapped)
            self._undo.append(
                lambda name=name, original=original: setattr(torch.Tensor, name, original)
            )

    def stop(self) -> None:
        while self._undo:
            self._undo.pop()()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--syncs-out", required=True, help="JSON file for the counts")
    parser.add_argument("--count-from", type=int, default=2, help="first optimizer step counted")
    parser.add_argument("--count-to", type=int, required=True,
                        help="first step not counted (<= train.max_steps)")  # fmt: skip
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    from avts_dist.cli.train import train_and_report
    from avts_dist.train.hooks import TrainHooks

    counter = SyncCounter("cuda" if torch.cuda.is_available() else "cpu")
    steps: set[int] = set()
    closed = False

    def on_loss(step: int, loss: torch.Tensor) -> torch.Tensor:
        if step == args.count_from and not steps:
            counter.start()
        nonlocal closed
        if step == args.count_to and not closed:
            counter.stop()
            closed = True
        if args.count_from <= step < args.count_to:
            steps.add(step)
        return loss

    try:
        code = train_and_report(args.config, args.overrides, hooks=TrainHooks(on_loss=on_loss))
    finally:
        counter.stop()
    # Whole steps only: the window closed at step count_to (else the run ended before it).
    num_steps = len(steps) if closed else 0
    report = {
        "mode": counter.mode,
        "first_step": args.count_from,
        "num_steps": num_steps,
        "num_syncs": sum(counter.by_caller.values()),
        "syncs_per_step": sum(counter.by_caller.values()) / num_steps if num_steps else None,
        "window_closed": closed,
        "by_caller": dict(counter.by_caller.most_common()),
    }
    Path(args.syncs_out).write_text(json.dumps(report, indent=1))
    return code


if __name__ == "__main__":
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    sys.exit(main())
