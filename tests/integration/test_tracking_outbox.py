"""The background MLflow writer against a real `mlflow server` that is stopped (its whole process
group killed) and started again on the same port with the same store.

- an outage: one warning, records handed over while the server is down are kept and replayed
  in order when it is back, each metric once;
- a writer killed before it saved its acknowledgement: the next one sends nothing twice (it
  reads back what the server holds), LoggedModels included;
- a server down from the start to the end: the run is created later by `avts sync-tracking`,
  which delivers everything once and, run again, has nothing to send.

The three share one server (``mlflow_outage_server``), each test finding it running.
"""

from __future__ import annotations

import json
import logging
import time

import pytest
from mlflow import MlflowClient

from avts_dist.cli import main as avts_main
from avts_dist.tracking.outbox import Outbox
from avts_dist.tracking.writer import TrackingWriter, configure_http

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _short_http_timeouts(monkeypatch):
    configure_http(5, 0)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


def _start(writer: TrackingWriter, name: str) -> int:
    return writer.submit("start", experiment="outbox", run_name=name,
                         tags={"avts.kind": "pretrain"}, resume_run_id="")  # fmt: skip


def _metrics(writer: TrackingWriter, steps) -> int:
    seq = 0
    for step in steps:
        seq = writer.submit("metrics", step=step, ts=int(time.time() * 1000),
                            metrics={"loss": 1.0 / step, "lr": 0.01 * step})  # fmt: skip
    return seq


def _wait(predicate, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def test_outage_is_buffered_and_replayed_in_order_once(mlflow_outage_server, tmp_path, caplog):
    server = mlflow_outage_server
    writer = TrackingWriter(Outbox(tmp_path / "tracking"), server.url)
    assert writer.wait_delivered(_start(writer, "outage"), 60)
    assert writer.wait_delivered(_metrics(writer, range(1, 6)), 60)

    caplog.set_level(logging.WARNING, logger="avts.tracking")
    server.stop()
    _metrics(writer, range(6, 11))
    _wait(lambda: writer.is_down)
    last = _metrics(writer, range(11, 21))
    counters = writer.counters
    assert counters.num_outages == 1 and counters.num_submitted_while_down >= 10
    assert writer.outbox.num_pending >= 10  # kept in the outbox file, not only in memory
    # The hand-over is a local file append: the caller never waits for the network.
    assert counters.max_submit_s < writer.retry_max_s

    server.start()
    assert writer.wait_delivered(last, 120)
    assert writer.close(5) == 0
    client = MlflowClient(server.url)
    assert _history(client, writer.run_id, "loss") == [(s, 1.0 / s) for s in range(1, 21)]
    assert [s for s, _ in _history(client, writer.run_id, "lr")] == list(range(1, 21))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("not reachable" in w for w in warnings) == 1, warnings
    assert sum("reachable again" in w for w in warnings) == 1, warnings


def test_replay_after_a_lost_acknowledgement_sends_nothing_twice(mlflow_outage_server, tmp_path):
    server = mlflow_outage_server
    folder = tmp_path / "tracking"
    writer = TrackingWriter(Outbox(folder), server.url)
    _start(writer, "lost-ack")
    _metrics(writer, range(1, 11))
    writer.submit("model", step=10, name="lost-ack-step10", params={"step": "10"},
                  tags={"avts.checkpoint": "/ckpt/step_000010"})  # fmt: skip
    last = _metrics(writer, range(11, 13))
    assert writer.wait_delivered(last, 60)
    writer.close(5)
    run_id = writer.run_id
    # A kill -9 right after the start was acknowledged: the server has everything, the
    # outbox's state says only the start was delivered.
    state = json.loads((folder / "state.json").read_text())
    state.update(acked_seq=1, key_steps={}, models={})
    (folder / "state.json").write_text(json.dumps(state))

    again = TrackingWriter(Outbox(folder), server.url)
    assert again.outbox.num_pending == 13  # 12 metrics records and the model
    assert again.wait_delivered(again.outbox.last_seq, 60)
    again.close(5)
    client = MlflowClient(server.url)
    assert _history(client, run_id, "loss") == [(s, 1.0 / s) for s in range(1, 13)]
    assert again.counters.num_metrics_sent == 0
    assert again.counters.num_metrics_already_there == 24
    experiment = client.get_run(run_id).info.experiment_id
    models = client.search_logged_models([experiment])
    assert [(m.name, m.tags["avts.step"], str(m.status)) for m in models] == [
        ("lost-ack-step10", "10", "READY")
    ]


def test_sync_tracking_delivers_what_a_run_could_not(mlflow_outage_server, tmp_path, capsys):
    server = mlflow_outage_server
    server.stop()
    run_dir = tmp_path / "run"
    (run_dir / "config.yaml").parent.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(f"tracking: {{uri: '{server.url}'}}\n")
    writer = TrackingWriter(Outbox(run_dir / "tracking"), server.url)
    _start(writer, "offline")
    _metrics(writer, range(1, 31))
    writer.submit("end", status="FINISHED")
    _wait(lambda: writer.is_down)
    assert writer.close(0.5) == 32  # nothing delivered: the run does not even exist yet
    assert not writer.run_id

    # Still down: one error line, exit 2, nothing lost.
    assert avts_main(["sync-tracking", str(run_dir)]) == 2
    assert "not reachable" in capsys.readouterr().err
    assert Outbox(run_dir / "tracking").num_pending == 32

    server.start()
    assert avts_main(["sync-tracking", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "delivered 32 records" in out
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    client = MlflowClient(server.url)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.runName"] == "offline"
    assert _history(client, run_id, "loss") == [(s, 1.0 / s) for s in range(1, 31)]
    assert avts_main(["sync-tracking", str(run_dir)]) == 0
    assert "nothing to send" in capsys.readouterr().out
