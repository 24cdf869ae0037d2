"""Training progress off a terminal: one short line every progress_every_s seconds (and one at the
end), never a tqdm bar (which writes every update to a file). A fake clock: no timing."""

from __future__ import annotations

import io
import logging

import pytest

from avts_dist.tracking import progress as progress_mod
from avts_dist.tracking.progress import Progress, format_duration


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_lines_every_n_seconds_off_a_terminal(monkeypatch, caplog):
    clock = _Clock()
    monkeypatch.setattr(progress_mod.time, "monotonic", clock)
    stream = io.StringIO()
    caplog.set_level(logging.INFO, logger="avts.progress")
    bar = Progress(True, total=1000, initial=0, every_s=30.0, stream=stream)
    assert bar.mode == "lines"
    for step in range(1, 1001):
        clock.now += 0.1  # 10 steps/s: 100 s for the run
        fields = {"loss": 1.0 / step, "data_wait": 0.125, "retries": step // 100}
        bar.update(step, fields)
    bar.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "avts.progress"]
    # Lines at 30, 60 and 90 s, and the last step at close: 100 s / 30 s, not 1000 updates.
    assert len(lines) == 4 == bar.num_lines
    assert stream.getvalue() == ""  # no bar written to the stream
    assert max(len(x) for x in lines) < 120
    first = lines[0]
    assert first.startswith("step 300/1000 (30%) | 10 steps/s | ETA 1 min 10 s | loss 0.0033")
    assert "data wait 12%" in first and "retries 3" in first
    assert lines[-1].startswith("step 1000/1000 (100%)") and "retries 10" in lines[-1]


def test_a_bar_only_on_a_terminal_and_nothing_when_off(caplog):
    caplog.set_level(logging.INFO, logger="avts.progress")
    term = _Terminal()
    bar = Progress(True, total=5, initial=0, every_s=0.001, stream=term)
    assert bar.mode == "bar"
    for step in range(1, 6):
        bar.update(step, {"loss": 0.5, "tracking": "MLflow down, 3 records buffered"})
    bar.close()
    assert "5/5" in term.getvalue() and "MLflow down" in term.getvalue()
    off = Progress(False, total=5, initial=0, stream=io.StringIO())
    off.update(1, {"loss": 0.5})
    off.close()
    assert off.mode == "off" and not caplog.records


@pytest.mark.parametrize(
    "seconds, text",
    [(None, "unknown"), (float("inf"), "unknown"), (42.4, "42 s"), (185, "3 min 05 s"),
     (7800, "2 h 10 min")],
)  # fmt: skip
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text
