"""The background MLflow writer: the training loop hands it records and never waits on MLflow.

:meth:`TrackingWriter.submit` appends the record to the run's outbox (a local file write, see
:mod:`avts_dist.tracking.outbox`) and returns. A daemon thread sends the records in order, in
batches, with bounded HTTP timeouts (MLflow's own ``MLFLOW_HTTP_REQUEST_TIMEOUT`` /
``_MAX_RETRIES`` / ``_BACKOFF_FACTOR``, set here unless the user set them).

When the server is down: one warning, the records stay in the outbox, the thread retries with
a growing pause (at most ``retry_max_s``); when the server answers again it says so in one line
and replays the backlog in order. What is still undelivered when the run ends is left for
``avts sync-tracking RUN_DIR``.

Delivery is idempotent, so nothing reaches the server twice: after any failed call the writer
reads back what the server holds (the run's latest step of each metric key, the LoggedModels of
the run, the run with this outbox's ``avts.tracking_id`` tag) before it sends again, and drops
a metric whose step the server already has. A resumed run re-logs the steps after its
checkpoint; those the server has from before the kill are dropped the same way.

What each record does on the server:

- ``start``: creates the run (or reopens it: ``RUNNING`` again) in ``experiment``;
- ``params`` / ``tags``: logged (params the run has already are left alone: MLflow refuses to
  change one);
- ``metrics``: ``log_batch``, up to 1000 metrics per call, with the time they were recorded;
- ``text``: an artifact (``config.yaml``, JSON files);
- ``model``: a LoggedModel of the run for one checkpoint (weights referenced, not copied);
- ``end``: ``set_terminated`` with the run's status.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from avts_dist.tracking.outbox import Outbox

__all__ = ["WriterCounters", "TrackingWriter", "configure_http", "is_permanent_error"]

log = logging.getLogger("avts.tracking")

# MLflow's limits per log_batch request.
_MAX_METRICS, _MAX_PARAMS, _MAX_TAGS = 1000, 100, 100
_PARAM_MAX = 6000
# The LoggedModel of a checkpoint: weights in our checkpoint store (MLflow's own tag name).
_EXTERNAL_TAG = "mlflow.model.isExternal"


def configure_http(timeout_s: int, max_retries: int) -> None:
    """Bounds every MLflow HTTP call of this process (MLflow reads these at each request); the
    user's own settings win."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(timeout_s)))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(int(max_retries)))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    # urllib3 logs each retry of MLflow's session as a warning: during an outage that is a line
    # per call; the writer says it once instead.
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


def is_permanent_error(exc: BaseException) -> bool:
    """A refusal that a retry would get again (HTTP 4xx but 429), not an outage."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        code = exc.get_http_status_code()
        return 400 <= code < 500 and code != 429
    return False


_ERROR_CHARS = 64  # the longest error summary a log line carries


def _one_line(exc: BaseException) -> str:
    """A tracking error in a few words (at most ``_ERROR_CHARS``) for the log: the MLflow call
    and why it failed.

    MLflow wraps the HTTP client's error in "API request to <url> failed with ..." and copies
    its whole text: urllib3's "Max retries exceeded ... (Caused by NewConnectionError(...))", a
    timeout's pool repr and advice, an HTML error page, "('Connection broken: IncompleteRead(...)".
    Which one a failed call gets depends on where it was when the server went: the call and the
    cause say it all.
    """
    text = " ".join(str(exc).split())
    if not text:
        return type(exc).__name__
    call = re.search(r"/api/[\d.]+/mlflow/([\w/-]+)", text)
    if not call:
        return _cut(text)
    for pattern in (
        r"too many (\d+) error responses",  # urllib3's retries on a status, then gave up
        r"error code (\d+)",
        r"Caused by (\w+)",
        r"(timed out)",
        r"(Connection (?:aborted|broken|reset|refused)|RemoteDisconnected|Broken pipe)",
    ):
        if found := re.search(pattern, text):
            reason = found.group(1)
            reason = f"HTTP {reason}" if reason.isdigit() else reason
            break
    else:  # an unknown shape: what follows "failed with (timeout) exception"
        after = re.search(r"failed with (?:timeout )?(?:exception )?(.*)", text)
        reason = (after.group(1) if after else text).lstrip("('\" ")
    return _cut(f"{call.group(1)}: {reason}")


def _cut(text: str) -> str:
    return text if len(text) <= _ERROR_CHARS else text[: _ERROR_CHARS - 3] + "..."


@dataclass
class WriterCounters:
    """What the writer did; the tests read them, ``avts sync-tracking`` prints them."""

    num_submitted: int = 0
    num_submitted_while_down: int = 0  # records the trainer handed over during an outage
    num_delivered: int = 0
    num_metrics_sent: int = 0
    num_metrics_already_there: int = 0  # dropped: the server had that key at that step
    num_failed_calls: int = 0
    num_outages: int = 0
    # Longest time submit() took: the trainer's only wait on tracking (a local file append).
    max_submit_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TrackingWriter:
    """Delivers one outbox to one MLflow tracking URI from a background thread."""

    def __init__(
        self,
        outbox: Outbox,
        tracking_uri: str,
        *,
        on_run_id: Callable[[str], None] | None = None,
        retry_max_s: float = 15.0,
        background: bool = True,
    ) -> None:
        from mlflow import MlflowClient

        self.outbox = outbox
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.counters = WriterCounters()
        self.retry_max_s = retry_max_s
        self._on_run_id = on_run_id
        self._cond = threading.Condition()
        self._queue: deque[dict[str, Any]] = deque(outbox.read(after_seq=outbox.state.acked_seq))
        self._down = False
        # Before the first call, and after any failed one, read back what the server holds.
        self._uncertain = True
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.last_error = ""
        outbox.acquire()
        if background:
            self._thread = threading.Thread(target=self._loop, name="avts-tracking", daemon=True)
            self._thread.start()

    # ---- the trainer's side: never waits on the network ----

    @property
    def run_id(self) -> str:
        return self.outbox.state.run_id

    @property
    def is_down(self) -> bool:
        return self._down

    def submit(self, op: str, **fields: Any) -> int:
        """Writes the record to the outbox and queues it; returns its number."""
        t0 = time.perf_counter()
        record = self.outbox.append({"op": op, **fields})
        with self._cond:
            self._queue.append(record)
            self.counters.num_submitted += 1
            self.counters.num_submitted_while_down += self._down
            self._cond.notify()
        self.counters.max_submit_s = max(self.counters.max_submit_s, time.perf_counter() - t0)
        return record["seq"]

    def wait_delivered(self, seq: int, timeout_s: float) -> bool:
        """Blocks until record ``seq`` is delivered or ``timeout_s`` passes (start-up, the end)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self.outbox.state.acked_seq < seq:
                left = deadline - time.monotonic()
                if left <= 0 or (self._thread is not None and not self._thread.is_alive()):
                    return False
                self._cond.wait(min(left, 0.5))
        return True

    def close(self, timeout_s: float) -> int:
        """Delivers what it can within ``timeout_s``; returns the number of records left in
        the outbox (for ``avts sync-tracking``)."""
        delivered = self.wait_delivered(self.outbox.last_seq, timeout_s)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            # A call in flight ends within MLflow's HTTP timeout; the thread is a daemon anyway.
            self._thread.join(timeout=1.0 if delivered else 0.1)
        self.outbox.release()
        return self.outbox.num_pending

    # ---- delivery ----

    def deliver_all(self) -> int:
        """Foreground delivery (``avts sync-tracking``): sends everything, raises on an outage;
        returns the number of records delivered."""
        num = 0
        while self._queue:
            batch = self._next_batch()
            if self._uncertain:
                self._reconcile()
            try:
                self._deliver(batch)
            except Exception as exc:
                if not is_permanent_error(exc):
                    raise
                self._drop(batch[0], exc)
                batch = batch[:1]
            self._ack(batch)
            num += len(batch)
        return num

    def _loop(self) -> None:
        pause = 1.0
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping and not self._queue:
                    return
                batch = self._next_batch()
            try:
                if self._uncertain:
                    self._reconcile()
                self._deliver(batch)
            except Exception as exc:  # any failure of the side channel; training goes on
                if is_permanent_error(exc):
                    self._drop(batch[0], exc)
                    self._ack(batch[:1])
                    continue
                self._failed(exc)
                # The pause is kept even as new records arrive (each submit notifies): an outage
                # costs one call per pause, not one per record.
                deadline = time.monotonic() + pause
                with self._cond:
                    while not self._stopping and (left := deadline - time.monotonic()) > 0:
                        self._cond.wait(left)
                    if self._stopping:
                        return
                pause = min(self.retry_max_s, pause * 2)
                continue
            pause = 1.0
            self._ack(batch)
            if self._down:
                self._down = False
                log.warning(
                    "MLflow %s reachable again: delivering the %d buffered tracking records",
                    self.tracking_uri,
                    len(self._queue),
                )

    def _next_batch(self) -> list[dict[str, Any]]:
        """The first record, or a run of consecutive ``metrics`` records (<= 1000 metrics)."""
        first = self._queue[0]
        if first["op"] != "metrics":
            return [first]
        batch, size = [], 0
        for rec in self._queue:
            if rec["op"] != "metrics" or (batch and size + len(rec["metrics"]) > _MAX_METRICS):
                break
            batch.append(rec)
            size += len(rec["metrics"])
        return batch

    def _failed(self, exc: BaseException) -> None:
        self.counters.num_failed_calls += 1
        self._uncertain = True
        self.last_error = _one_line(exc)
        if not self._down:
            self._down = True
            self.counters.num_outages += 1
            log.warning(
                "MLflow %s not reachable (%s): training goes on; tracking records are kept "
                "in the run dir and sent when it answers (or later: avts sync-tracking %s)",
                self.tracking_uri,
                self.last_error,
                self.outbox.folder.parent,
            )

    def _drop(self, record: dict[str, Any], exc: BaseException) -> None:
        self.outbox.state.num_dropped += 1
        log.warning(
            "MLflow refused tracking record %d (%s): %s",
            record["seq"],
            record["op"],
            _one_line(exc),
        )

    def _ack(self, batch: list[dict[str, Any]]) -> None:
        with self._cond:
            for _ in batch:
                self._queue.popleft()
            self.outbox.state.acked_seq = batch[-1]["seq"]
            self.outbox.save_state()
            self.counters.num_delivered += len(batch)
            self._cond.notify_all()

    # ---- what the server holds ----

    def _reconcile(self) -> None:
        state = self.outbox.state
        if state.run_id:
            run = self.client.get_run(state.run_id)
            # run.data carries each key's latest metric with its step (what MLflow's own
            # system-metrics monitor reads to resume its step count).
            for metric in run.data._metric_objs:
                if metric.step > state.key_steps.get(metric.key, -1):
                    state.key_steps[metric.key] = metric.step
        self._uncertain = False

    def _deliver(self, batch: list[dict[str, Any]]) -> None:
        op = batch[0]["op"]
        if op == "start":
            self._start(batch[0])
            return
        run_id = self.outbox.state.run_id
        if not run_id:
            raise RuntimeError("no MLflow run yet")  # a "start" failed for good; kept for later
        if op == "metrics":
            self._metrics(run_id, batch)
        elif op == "params":
            self._params(run_id, batch[0]["params"])
        elif op == "tags":
            from mlflow.entities import RunTag

            tags = [RunTag(k, str(v)) for k, v in batch[0]["tags"].items()]
            for i in range(0, len(tags), _MAX_TAGS):
                self.client.log_batch(run_id, tags=tags[i : i + _MAX_TAGS])
        elif op == "text":
            self.client.log_text(run_id, batch[0]["text"], batch[0]["artifact_file"])
        elif op == "model":
            self._model(run_id, batch[0])
        elif op == "end":
            self.client.set_terminated(run_id, status=batch[0]["status"])
        else:
            raise ValueError(f"unknown tracking record op {op!r}")

    def _start(self, rec: dict[str, Any]) -> None:
        state, client = self.outbox.state, self.client
        run_id = state.run_id or rec.get("resume_run_id", "")
        if run_id:
            try:
                run = client.get_run(run_id)
            except Exception as exc:
                if not is_permanent_error(exc):
                    raise
                log.warning(
                    "MLflow run %s is not in %s (%s): starting a new run",
                    run_id,
                    self.tracking_uri,
                    _one_line(exc),
                )
                rec = {**rec, "tags": {**rec["tags"], "avts.previous_run_id": run_id}}
                run_id = state.run_id = ""
            else:
                client.update_run(run_id, status="RUNNING")
                state.experiment_id = run.info.experiment_id
        if not run_id:
            exp = client.get_experiment_by_name(rec["experiment"])
            exp_id = exp.experiment_id if exp else client.create_experiment(rec["experiment"])
            found = client.search_runs(
                [exp_id], filter_string=f"tags.`avts.tracking_id` = '{state.tracking_id}'"
            )
            if found:  # created by a call whose reply was lost
                run_id = found[0].info.run_id
                client.update_run(run_id, status="RUNNING")
            else:
                tags = {**rec["tags"], "avts.tracking_id": state.tracking_id}
                run_id = client.create_run(exp_id, tags=tags, run_name=rec["run_name"]).info.run_id
            state.experiment_id = exp_id
        state.run_id = run_id
        self.outbox.save_state()
        if self._on_run_id is not None:
            self._on_run_id(run_id)

    def _params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(run_id).data.params
        items = [Param(k, str(v)[:_PARAM_MAX]) for k, v in params.items() if k not in existing]
        for i in range(0, len(items), _MAX_PARAMS):
            self.client.log_batch(run_id, params=items[i : i + _MAX_PARAMS])

    def _metrics(self, run_id: str, batch: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric

        key_steps = self.outbox.state.key_steps
        items, newest = [], {}
        for rec in batch:
            step = int(rec["step"])
            for key, value in rec["metrics"].items():
                if step <= key_steps.get(key, -1) or step <= newest.get(key, -1):
                    self.counters.num_metrics_already_there += 1
                    continue
                items.append(Metric(key, float(value), int(rec["ts"]), step))
                newest[key] = step
        for i in range(0, len(items), _MAX_METRICS):
            self.client.log_batch(run_id, metrics=items[i : i + _MAX_METRICS])
        key_steps.update(newest)
        self.counters.num_metrics_sent += len(items)

    def _model(self, run_id: str, rec: dict[str, Any]) -> None:
        """One LoggedModel per checkpoint step, found again rather than made twice."""
        state, client = self.outbox.state, self.client
        step = str(rec["step"])
        if step in state.models:
            return
        if not state.experiment_id:
            state.experiment_id = client.get_run(run_id).info.experiment_id
        found = client.search_logged_models(
            [state.experiment_id],
            filter_string=f"source_run_id = '{run_id}' AND tags.`avts.step` = '{step}'",
            max_results=1,
        )
        if found:  # created by a call whose reply was lost
            model_id = found[0].model_id
            if str(found[0].status) != "READY":
                client.finalize_logged_model(model_id, "READY")
        else:
            tags = {**rec["tags"], "avts.step": step, _EXTERNAL_TAG: "true"}
            params = {k: str(v)[:_PARAM_MAX] for k, v in rec["params"].items()}
            model = client.create_logged_model(
                state.experiment_id, name=rec["name"], source_run_id=run_id, tags=tags,
                params=params, model_type="avts-checkpoint",
            )  # fmt: skip
            model_id = model.model_id
            client.finalize_logged_model(model_id, "READY")
        state.models[step] = model_id
        self.outbox.save_state()
