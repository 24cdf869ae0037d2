"""The real trainer under the real local SLURM cluster, on the synthetic corpus.

2 SLURM tasks per job (gloo), the tiny CPU model. One uninterrupted run chained with export and
the `sync` evaluation; one run that SLURM signals while training (``scancel --signal=USR2``: the
signal and handler a time limit reaches, without waiting for SLURM's minute-granular limit; the
real time limit is tested once, on the stand-in trainer, in test_slurm_launch.py), which saves,
is requeued, resumes and must end with every loss bitwise equal and the same MLflow run; one run
stopped with scancel whose checkpoint must export.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

import avts_dist.tracking.eval_runs  # noqa: F401  (allows MLflow's local file store)
from avts_dist.cli import main as avts_main
from tests.fixtures.slurm import job_logs, scontrol_job, wait_state, wait_through_requeues

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.usefixtures("slurm_cluster")]

# Long enough that a signal sent after step 10 lands mid-training (a few seconds of steps).
MAX_STEPS = 120


def _config(tmp: Path, name: str, corpus: str, mlruns: Path) -> Path:
    path = tmp / f"{name}.yaml"
    quickstart = Path(__file__).resolve().parents[2] / "configs" / "pretrain" / "quickstart.yaml"
    path.write_text(
        f"""base: {quickstart}
run:
  name: {name}
  dir: {tmp / name}
data:
  url: {corpus}
  global_batch_size: 4
  num_workers: 0
checkpoint:
  every_steps: 0
train:
  max_steps: {MAX_STEPS}
  log_every: 10
  val_every_steps: 0
  progress: false
tracking:
  uri: {mlruns}
  experiment: slurm-tests
  system_metrics: false
curriculum:
  stages:
    - name: easy
      negative_mix: {{easy: 1.0}}
"""
    )
    return path


def _launch(capsys, cfg: Path, *extra: str) -> tuple[int, dict]:
    capsys.readouterr()
    argv = ["launch", "pretrain", "--json", "--config", str(cfg), "--tasks-per-node", "2"]
    status = avts_main([*argv, "--time", "00:10:00", "--grace-s", "30", *extra])
    out = capsys.readouterr().out.strip().splitlines()
    return status, (json.loads(out[-1]) if out else {})


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _final_loss(run_dir: Path) -> float:
    return [m for m in _metrics(run_dir) if "loss" in m][-1]["loss"]


@pytest.fixture(scope="module")
def mlruns(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("slurm-mlruns") / "mlruns"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, synth_corpus, mlruns):
    """pretrain -> export -> eval sync, chained with afterok, waited for."""
    tmp = tmp_path_factory.mktemp("slurm-real")
    cfg = _config(tmp, "ref", synth_corpus, mlruns)
    argv = ["launch", "pretrain", "--json", "--config", str(cfg), "--tasks-per-node", "2"]
    argv += ["--time", "00:10:00", "--grace-s", "30", "--eval-suite", "sync", "--wait"]
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        status = avts_main(argv)
    info = json.loads(buf.getvalue().strip().splitlines()[-1])
    return status, info, tmp / "ref"


def test_two_task_run_checkpoint_mlflow_and_chained_sync_eval(reference, mlruns):
    import torch
    from mlflow import MlflowClient

    from avts_dist.train import list_checkpoints

    status, info, run_dir = reference
    assert status == 0, info
    assert set(info["states"].values()) == {"COMPLETED"}
    newest = list_checkpoints(str(run_dir / "checkpoints"))[-1]
    tag, meta = newest.tag, newest.meta
    assert newest.step == MAX_STEPS and tag == f"step_{MAX_STEPS:06d}"
    # Both ranks ran: one log per rank, and the run saw world size 2.
    assert meta["world_size"] == 2
    logs = sorted((run_dir / "slurm").glob(f"{info['pretrain']}_*_log.out"))
    assert [p.name.split("_")[1] for p in logs] == ["0", "1"]
    # The chained export job consolidated that very checkpoint.
    exported = torch.load(run_dir / "export" / "model.pt", weights_only=True)
    assert exported["step"] == MAX_STEPS and exported["source_checkpoint"].endswith(tag)

    client = MlflowClient(tracking_uri=mlruns.as_uri())
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    parent = client.get_run(run_id)
    assert parent.info.status == "FINISHED"
    history = client.get_metric_history(run_id, "loss")
    assert max(m.step for m in history) == MAX_STEPS
    assert history[-1].value == pytest.approx(_final_loss(run_dir), rel=1e-6)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'"
    )
    assert [c.data.tags.get("avts.eval") for c in children] == ["sync"]
    child = children[0]
    assert child.info.status == "FINISHED" and child.data.metrics
    # afterok: the eval started only after pretraining had ended.
    assert child.info.start_time >= parent.info.end_time


def test_preemption_signal_saves_requeues_and_finishes_bitwise(
    reference, tmp_path, capsys, synth_corpus, mlruns
):
    """A real pretraining job is signalled while training, as SLURM signals it grace_s before its
    time limit (USR2 to every task of the job's steps): the trainer saves, rank 0 requeues, the
    requeued job resumes and finishes with every step's loss bitwise equal to the uninterrupted
    reference, in the same MLflow run."""
    _, _, ref_dir = reference
    cfg = _config(tmp_path, "limit", synth_corpus, mlruns)
    capsys.readouterr()
    argv = ["launch", "pretrain", "--json", "--config", str(cfg), "--tasks-per-node", "2"]
    argv += ["--time", "00:10:00", "--grace-s", "100", "--max-requeues", "3"]
    assert avts_main(argv) == 0
    job = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["pretrain"]
    run_dir = tmp_path / "limit"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(_metrics(run_dir)) < 10:
        time.sleep(0.2)
    assert len(_metrics(run_dir)) >= 10, "training never started"
    first_run_id = (run_dir / "mlflow_run_id").read_text().strip()
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    state = wait_through_requeues(job, 300)
    assert state == "COMPLETED", f"job {job} ended {state}\n{job_logs(run_dir / 'slurm', job)}"
    assert int(scontrol_job(job)["Restarts"]) >= 1
    err = (run_dir / "slurm" / f"{job}_0_log.err").read_text()
    assert "trainer returned preempted" in err and "requeue 1 of at most" in err
    # The trainer saved mid-training, and the requeued job went on from that checkpoint.
    saved = sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*"))
    assert saved[0] < MAX_STEPS and saved[-1] == MAX_STEPS, saved
    ref, got = _metrics(ref_dir), _metrics(run_dir)
    assert [m["step"] for m in got] == list(range(1, MAX_STEPS + 1))
    assert [m["loss"] for m in got] == [m["loss"] for m in ref]
    assert (run_dir / "mlflow_run_id").read_text().strip() == first_run_id
    from mlflow import MlflowClient

    steps = [m.step for m in MlflowClient(mlruns.as_uri()).get_metric_history(first_run_id, "loss")]
    assert max(steps) == MAX_STEPS


def test_scancel_leaves_an_exportable_checkpoint(tmp_path, capsys, synth_corpus, mlruns):
    import torch

    from avts_dist.train import list_checkpoints

    cfg = _config(tmp_path, "cancel", synth_corpus, mlruns)
    status, info = _launch(capsys, cfg, "train.max_steps=400")
    assert status == 0
    job, run_dir = info["pretrain"], tmp_path / "cancel"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and len(_metrics(run_dir)) < 2:
        time.sleep(0.5)
    subprocess.run(["scancel", job], check=True)
    wait_state(job, {"CANCELLED"}, timeout_s=60)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and scontrol_job(job).get("JobState") != "CANCELLED":
        time.sleep(0.5)
    found = []
    while time.monotonic() < deadline and not found:
        found = list_checkpoints(str(run_dir / "checkpoints"))
        time.sleep(0.5)
    assert found, "scancel left no complete checkpoint"
    assert scontrol_job(job).get("Restarts") == "0", "a cancelled job must not requeue"
    out = tmp_path / "model.pt"
    assert (
        avts_main(["export", "--checkpoint", str(run_dir / "checkpoints"), "--out", str(out)]) == 0
    )
    exported = torch.load(out, weights_only=True)
    assert 0 < exported["step"] < 400 and exported["video"]
