"""The per-step metrics logger: strict JSON lines, losses averaged at flush, skipped steps as
null, total_steps and time on every line, lines of replayed steps dropped on resume; the step
timer's log-step fields and the loader telemetry as data/* fields."""

from __future__ import annotations

import json
import math

import torch

from avts_dist.tracking import MetricsLogger, StepRecord, StepTimer, telemetry_fields


class Recorder:
    """A tracker that keeps what it is sent (the MLflow run's interface)."""

    def __init__(self) -> None:
        self.metrics: list[tuple[int, dict]] = []

    def log_metrics(self, metrics, step):
        self.metrics.append((step, dict(metrics)))


def test_lines_are_strict_json_with_null_for_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    tracker = Recorder()
    log = MetricsLogger(path, device=torch.device("cpu"), world_size=1, is_main=True,
                        total_steps=30, tracker=tracker)  # fmt: skip
    log.record(StepRecord(1, 0, 0.1, 4, torch.tensor(0.5), {"train/x": 1.0, "val/y": math.nan},
                          time=1000.25))  # fmt: skip
    log.record(StepRecord(2, 0, 0.1, 8, None, {"skipped_step": True, "num_skipped_steps": 1}))
    log.record(StepRecord(3, 1, 0.2, 12, torch.tensor(math.inf), {"curriculum": [{"to": "h"}]}))
    assert not path.exists()  # buffered until a flush
    lines = log.flush()
    text = path.read_text()
    parsed = [json.loads(line) for line in text.splitlines()]  # strict: no NaN/Infinity tokens
    assert "NaN" not in text and "Infinity" not in text
    assert [p["loss"] for p in parsed] == [0.5, None, None]
    assert parsed[0] == {"step": 1, "epoch": 0, "loss": 0.5, "lr": 0.1, "samples_seen": 4,
                         "total_steps": 30, "time": 1000.25, "train/x": 1.0,
                         "val/y": None}  # fmt: skip
    assert all(p["total_steps"] == 30 and p["time"] > 1e9 for p in parsed[1:])
    assert parsed[1]["skipped_step"] is True and parsed[2]["curriculum"] == [{"to": "h"}]
    assert lines == parsed and log.last_loss == 0.5
    # MLflow gets the numeric metrics only (no step, time, total, events or flags).
    assert tracker.metrics[0] == (1, {"epoch": 0, "loss": 0.5, "lr": 0.1, "samples_seen": 4,
                                      "train/x": 1.0})  # fmt: skip
    assert "curriculum" not in tracker.metrics[2][1]
    assert log.flush() == []


def test_truncate_after_drops_replayed_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLogger(path, device=torch.device("cpu"), world_size=1, is_main=True)
    for step in range(1, 7):
        log.record(StepRecord(step, 0, 0.1, 4 * step, torch.tensor(float(step))))
    log.flush()
    log.truncate_after(4)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3, 4]
    other = MetricsLogger(tmp_path / "m2.jsonl", device=torch.device("cpu"), world_size=1,
                          is_main=False)  # fmt: skip
    other.record(StepRecord(1, 0, 0.1, 4, torch.tensor(1.0)))
    assert other.flush()[0]["loss"] == 1.0 and not (tmp_path / "m2.jsonl").exists()


def test_step_timer_fields_and_window():
    timer = StepTimer()
    timer.add(wait_s=1.0, compute_s=3.0)
    timer.add(wait_s=0.0, compute_s=4.0)
    fields = timer.take({"data/clips_per_s": 12.5, "data/skipped_total": 2})
    assert fields == {"data/wait_fraction": 0.125, "data/clips_per_s": 12.5,
                      "data/skipped_total": 2, "train/step_s": 4.0}  # fmt: skip
    assert timer.take({})["data/wait_fraction"] == 0.0


def test_telemetry_fields_log_every_numeric_key():
    telemetry = {
        "clips": 40, "clips_per_s": 12.5, "retries": 3, "read_failures": 1,
        "skipped": {"decode_error": 2, "no_audio": 1}, "skipped_total": 3,
        "filtered": {"too_short": 4}, "global_step": 10, "epoch": 1,
        "access": "block", "some_flag": True,
    }  # fmt: skip
    assert telemetry_fields(telemetry) == {
        "data/clips": 40, "data/clips_per_s": 12.5, "data/retries": 3, "data/read_failures": 1,
        "data/skipped/decode_error": 2, "data/skipped/no_audio": 1, "data/skipped_total": 3,
        "data/filtered/too_short": 4,
    }  # fmt: skip
