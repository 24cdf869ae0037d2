"""The real trainer (`avts train`) against a real `mlflow server` killed mid-run (its process
group) and started again on the same port: training goes on and finishes, one warning, every
metric reaches the server in order, once; each checkpoint is a LoggedModel of the run (weights
referenced), evaluation runs link their metrics to it, and `avts compare --best` ranks the
checkpoints through MLflow's search_logged_models.

No timing assertions: the trainer's own counters (tracking/writer.json) say how many records it
handed over while the server was down, and metrics.jsonl's `time` says how many steps ended
inside the outage.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from mlflow import MlflowClient

from avts_dist.cli import main as avts_main
from avts_dist.config import REPO_ROOT
from avts_dist.tracking.writer import _ERROR_CHARS
from tests.fixtures.mlflow_server import MlflowServer

pytestmark = pytest.mark.slow

MAX_STEPS, EVERY = 60, 20


def _steps(path) -> list[dict]:
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(x) for x in lines if x.endswith("}")]


@pytest.fixture(scope="module")
def outage_run(tmp_path_factory, synth_corpus):
    work = tmp_path_factory.mktemp("outage_run")
    server = MlflowServer(work / "server").start()
    run_dir = work / "run"
    config = work / "outage.yaml"
    config.write_text(
        f"base: {REPO_ROOT / 'configs' / 'pretrain' / 'quickstart.yaml'}\n"
        f"run: {{name: outage, dir: {run_dir}}}\n"
        f"data: {{url: {synth_corpus}, global_batch_size: 2, num_workers: 0}}\n"
        f"train: {{max_steps: {MAX_STEPS}, log_every: 1, progress: true, progress_every_s: 2}}\n"
        f"checkpoint: {{every_steps: {EVERY}, keep_last: 3}}\n"
        f"tracking: {{uri: '{server.url}', experiment: outage, request_timeout_s: 5, "
        "flush_timeout_s: 300, system_metrics_every_s: 1}\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    with open(work / "stdout", "w") as out, open(work / "stderr", "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "avts_dist", "train", "--config", str(config)],
            cwd=work, env=env, stdout=out, stderr=err,
        )  # fmt: skip
        metrics = run_dir / "metrics.jsonl"
        try:
            deadline = time.monotonic() + 600
            while len(_steps(metrics)) < 3:
                assert proc.poll() is None, (work / "stderr").read_text()[-3000:]
                assert time.monotonic() < deadline
                time.sleep(0.05)
            down_at = time.time()
            server.stop()
            killed_at_step = len(_steps(metrics))
            while len(_steps(metrics)) < killed_at_step + 8 and proc.poll() is None:
                time.sleep(0.05)
            server.start()
            up_at = time.time()
            rc = proc.wait(timeout=900)
        finally:
            if proc.poll() is None:
                proc.kill()
    yield {
        "rc": rc, "work": work, "run_dir": run_dir, "server": server, "down_at": down_at,
        "up_at": up_at, "stderr": (work / "stderr").read_text(),
    }  # fmt: skip
    server.stop()


def test_training_outlives_the_tracking_server(outage_run):
    run_dir, stderr = outage_run["run_dir"], outage_run["stderr"]
    assert outage_run["rc"] == 0, stderr[-3000:]
    lines = _steps(run_dir / "metrics.jsonl")
    assert [x["step"] for x in lines] == list(range(1, MAX_STEPS + 1))
    # Steps went on while the server was down: the trainer never waited on MLflow.
    during = [x for x in lines if outage_run["down_at"] < x["time"] < outage_run["up_at"]]
    assert len(during) >= 8
    counters = json.loads((run_dir / "tracking" / "writer.json").read_text())
    assert counters["num_outages"] == 1 and counters["num_submitted_while_down"] >= 8
    assert counters["num_pending"] == 0
    assert stderr.count("not reachable") == 1, stderr[-3000:]
    # The log a person reads: only our own lines (urllib3's warning per retried call and
    # DeepSpeed's start-up notes are silenced at their source), short; off a terminal the
    # progress is a line every progress_every_s seconds, not a bar.
    log_lines = [x for x in stderr.splitlines() if x.strip()]
    assert all("] avts." in x for x in log_lines), "\n".join(log_lines[:20])
    # The longest is the outage warning: about 210 characters of its own, the run dir, and the
    # MLflow error in a few words (at most _ERROR_CHARS; a CI run once logged 200 of urllib3's).
    longest = max(log_lines, key=len)
    assert len(longest) < 220 + len(str(run_dir)) + _ERROR_CHARS, longest
    progress = [x for x in log_lines if "] avts.progress: step " in x]
    assert max(len(x) for x in progress) < 200
    assert 1 <= len(progress) < MAX_STEPS and progress[-1].count(f"step {MAX_STEPS}/{MAX_STEPS}")
    assert any("MLflow down" in x for x in progress)

    client = MlflowClient(outage_run["server"].url)
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key in ("loss", "lr", "samples_seen"):
        history = [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
        assert history == [(x["step"], x[key]) for x in lines], key
    assert "data/retries" in run.data.metrics and "system/cpu_utilization_percentage" in (
        run.data.metrics
    )


def test_checkpoints_are_logged_models_linked_to_evaluations(outage_run, capsys):
    from eval.run import evaluate

    run_dir, server = outage_run["run_dir"], outage_run["server"]
    client = MlflowClient(server.url)
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    experiment = client.get_run(run_id).info.experiment_id
    models = {m.tags["avts.step"]: m for m in client.search_logged_models([experiment])}
    assert sorted(models, key=int) == [str(s) for s in range(EVERY, MAX_STEPS + 1, EVERY)]
    for step, model in models.items():
        checkpoint = model.tags["avts.checkpoint"]
        assert model.source_run_id == run_id and str(model.status) == "READY"
        assert checkpoint.endswith(f"step_{int(step):06d}") and os.path.isdir(checkpoint)
        assert model.params["step"] == step and model.params["model.video_arch"]
        # Referenced, not copied: the model holds no weights in MLflow's artifact store.
        assert not client.list_logged_model_artifacts(model.model_id)

    results = {}
    for step in (str(EVERY), str(MAX_STEPS)):
        result = evaluate("sync", models[step].tags["avts.checkpoint"], tracking_uri=server.url,
                          out_dir=str(outage_run["work"] / f"eval{step}"))  # fmt: skip
        assert result.extra["model_id"] == models[step].model_id
        results[step] = result
    for step, result in results.items():
        linked = client.get_logged_model(models[step].model_id).metrics
        acc = [m for m in linked if m.key == "sync/acc"]
        assert [(m.value, m.run_id) for m in acc] == [(result.metrics["acc"], result.run_id)]

    assert avts_main(["compare", "--best", "sync/acc", "--tracking-uri", server.url,
                      "--experiment", "outage"]) == 0  # fmt: skip
    out = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in out[2:]]
    # Best first: (value, step, checkpoint) of each row, the values not increasing.
    printed = [(float(r[1]), r[2], r[-1]) for r in rows]
    expected = {(round(res.metrics["acc"], 4), s, models[s].tags["avts.checkpoint"])
                for s, res in results.items()}  # fmt: skip
    assert set(printed) == expected and [p[0] for p in printed] == sorted(
        (p[0] for p in printed), reverse=True
    )
