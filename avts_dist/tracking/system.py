"""System metrics (CPU, memory, disk, network, GPU) as MLflow's own monitors measure them,
sampled on a daemon thread and delivered through the run's :class:`TrackingWriter`, so that an
outage of the server loses none and never stops the sampling (MLflow's own monitor thread ends
at its first failed call).

Names are MLflow's (``system/cpu_utilization_percentage``, ...); on a multi-node run each node's
first local rank samples its own machine under ``system/<node id>/...``. The step is the
number of seconds since the run's tracking started, which keeps growing across resumes.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from avts_dist.tracking.writer import TrackingWriter

__all__ = ["SystemMetricsSampler", "node_id_for"]

log = logging.getLogger("avts.tracking")


def node_id_for(rank: int, world_size: int) -> str | None:
    """``node<k>`` on a multi-node run (the launcher's ``LOCAL_WORLD_SIZE`` < world size), None
    on one node (MLflow's names without a node part)."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size) or world_size)
    if local_world <= 0 or local_world >= world_size:
        return None
    node = os.environ.get("GROUP_RANK") or os.environ.get("SLURM_NODEID") or rank // local_world
    return f"node{node}"


class SystemMetricsSampler:
    def __init__(
        self, writer: TrackingWriter, *, node_id: str | None, interval_s: float = 10.0
    ) -> None:
        # MLflow logs its GPU probe's outcome at INFO on every start.
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        # Only its monitors and their collect/aggregate are used; it sends nothing itself.
        self._mlflow = SystemMetricsMonitor(run_id="", tracking_uri=writer.tracking_uri)
        self._writer = writer
        self._prefix = "system/" + (f"{node_id}/" if node_id else "")
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._origin = writer.outbox.state.created_s
        self._thread = threading.Thread(target=self._loop, name="avts-system-metrics", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self._mlflow.collect_metrics()
                values = self._mlflow.aggregate_metrics()
                for monitor in self._mlflow.monitors:
                    monitor.clear_metrics()
            except Exception as exc:  # psutil or a GPU library failing: stop sampling, say why
                log.warning("system metrics stopped: %s", str(exc).splitlines()[0][:200])
                return
            now = time.time()
            self._writer.submit(
                "metrics",
                step=int(now - self._origin),
                ts=int(now * 1000),
                metrics={self._prefix + k: float(v) for k, v in values.items()},
            )

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
