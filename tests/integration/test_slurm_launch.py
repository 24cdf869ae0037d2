"""`avts launch` on the real local SLURM cluster (slurm-wlm + munge, started by the fixture).

Jobs are submitted through the real CLI, run as 2 SLURM tasks with torch.distributed gloo, and
are checked through SLURM itself (scontrol), the run directory and the checkpoint.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from avts_dist.cli import main as avts_main
from tests.fixtures.slurm import job_logs, scontrol_job, wait_state, wait_through_requeues

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.usefixtures("slurm_cluster")]

TOY = "tests.fixtures.slurm:toy_run_training"
MAX_STEPS = 60


def _config(tmp: Path, name: str, max_steps: int = MAX_STEPS) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(
        f"run:\n  name: {name}\n  dir: {tmp / name}\ntrain:\n  max_steps: {max_steps}\n"
    )
    return path


def _launch(capsys, *argv: str) -> tuple[int, dict]:
    capsys.readouterr()
    status = avts_main(["launch", "pretrain", "--json", *argv])
    out = capsys.readouterr().out.strip().splitlines()
    return status, (json.loads(out[-1]) if out else {})


def _final_loss(run_dir: Path) -> float:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1])["loss"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 2-task run: its final loss is what every resumed run must reach."""
    tmp = tmp_path_factory.mktemp("slurm-ref")
    # sbatch passes the submitting environment to the job; the fixture's change ends with it.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AVTS_TOY_STEP_S", "0.01")
        status = avts_main(
            [
                "launch",
                "pretrain",
                "--config",
                str(_config(tmp, "ref")),
                "--trainer",
                TOY,
                "--tasks-per-node",
                "2",
                "--time",
                "00:05:00",
                "--grace-s",
                "30",
                "--wait",
            ]
        )
    return status, tmp / "ref"


def test_two_task_job_completes_with_checkpoint(reference):
    status, run_dir = reference
    assert status == 0
    ckpt = run_dir / "checkpoints" / f"step_{MAX_STEPS:06d}"
    assert (ckpt / "COMPLETE").read_text() == "completed"
    # Both ranks wrote their shard, at the same step: the job really ran 2 gloo processes.
    shards = [json.loads((ckpt / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [s["step"] for s in shards] == [MAX_STEPS, MAX_STEPS]
    # The averaged gradient of (w-1)^2 and (w-2)^2 drives w to 1.5: only with world size 2.
    assert shards[0]["w"] == pytest.approx(1.5, abs=1e-2)
    logs = sorted(p.name for p in (run_dir / "slurm").glob("*_log.out"))
    assert len(logs) == 2 and logs[0].endswith("_0_log.out") and logs[1].endswith("_1_log.out")


def test_scancel_saves_and_does_not_requeue(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AVTS_TOY_STEP_S", "0.2")
    cfg = _config(tmp_path, "cancel")
    status, info = _launch(
        capsys, "--config", str(cfg), "--trainer", TOY, "--tasks-per-node", "2", "--time", "5"
    )
    assert status == 0
    job = info["pretrain"]
    metrics = tmp_path / "cancel" / "metrics.jsonl"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not (metrics.exists() and metrics.stat().st_size):
        time.sleep(0.3)
    subprocess.run(["scancel", job], check=True)
    wait_state(job, {"CANCELLED"}, timeout_s=60)
    deadline = time.monotonic() + 30
    done: list[Path] = []
    while time.monotonic() < deadline and not done:
        done = sorted((tmp_path / "cancel" / "checkpoints").glob("step_*/COMPLETE"))
        time.sleep(0.3)
    assert done, "no complete checkpoint after scancel"
    assert 0 < int(done[-1].parent.name.split("_")[1]) < MAX_STEPS
    assert scontrol_job(job).get("Restarts") == "0", "a cancelled job must not requeue itself"


def test_real_time_limit_signals_saves_requeues_and_finishes(tmp_path, capsys, monkeypatch):
    """The one test that waits for SLURM's own time limit. The signal is due grace_s before the
    limit and lands at slurmctld's next time-limit check (every ~30 s): with a 2-minute limit
    and grace_s 60 it lands 60-90 s in. The trainer's handler must be in place by then: a signal
    that lands earlier (one CI run: due 15 s in, with a 1-minute limit) reaches submitit's own
    handler while the job's interpreter is still starting, which requeues without the trainer's
    save. The stand-in trainer saves at a step boundary, rank 0 requeues, and the requeued job
    resumes and finishes: every step logged exactly once. The real trainer's side of the same
    signal (a bitwise resume) is test_slurm_pretrain.py's, with scancel --signal."""
    steps = 2000  # 0.1 s a step: longer than the 2-minute limit
    monkeypatch.setenv("AVTS_TOY_STEP_S", "0.1")
    monkeypatch.setenv("AVTS_TOY_REQUEUED_STEP_S", "0.002")
    cfg = _config(tmp_path, "limit", max_steps=steps)
    argv = ["--config", str(cfg), "--trainer", TOY, "--tasks-per-node", "2"]
    status, info = _launch(capsys, *argv, "--time", "2", "--grace-s", "60", "--max-requeues", "2")
    assert status == 0
    job, run_dir = info["pretrain"], tmp_path / "limit"
    # Requeued jobs are released at once, with room to finish.
    state = wait_through_requeues(job, 300, time_limit_min=5)
    assert state == "COMPLETED", f"job {job} ended {state}\n{job_logs(run_dir / 'slurm', job)}"
    assert int(scontrol_job(job)["Restarts"]) >= 1
    err = (run_dir / "slurm" / f"{job}_0_log.err").read_text()
    assert "trainer returned preempted" in err and "requeue 1 of at most" in err
    saved = sorted(int(p.parent.name.split("_")[1]) for p in run_dir.glob("checkpoints/*/COMPLETE"))
    assert 0 < saved[0] < steps and saved[-1] == steps, saved
    logged = [
        json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert logged == list(range(1, steps + 1))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--partition", "nosuch"], "unknown partition 'nosuch'"),
        (["--time", "99:00:00"], "exceeds partition 'debug'"),
        (["--time", "00:00:00"], "impossible time limit"),
        (["--nodes", "5"], "5 nodes requested"),
        (["--gpus-per-node", "1"], "has no GPUs"),
    ],
)
def test_bad_cluster_options_fail_before_submitting(tmp_path, capsys, flags, message):
    # Jobs named after this run only: the cluster may be running other people's jobs meanwhile.
    queued = ["squeue", "-h", "-o", "%i", "--name", "bad"]
    before = subprocess.run(queued, capture_output=True, text=True).stdout
    status = avts_main(
        ["launch", "pretrain", "--config", str(_config(tmp_path, "bad")), "--trainer", TOY, *flags]
    )
    err = capsys.readouterr().err
    assert status == 2
    assert message in err and "Traceback" not in err
    after = subprocess.run(queued, capture_output=True, text=True).stdout
    assert after == before
    assert not (tmp_path / "bad").exists(), "nothing may be written before the checks pass"


def test_cpus_per_gpu_read_from_the_real_sinfo():
    """The local cluster's sinfo, parsed: a CPU partition (no GPUs), so cpus_per_task stays 1
    without GPUs, and the CPUs per node are those scontrol reports."""
    from avts_dist.config import LaunchConfig
    from launch import executors

    shapes = executors.query_cpus_gpus()
    parts = executors.query_partitions()
    default = next(p for p in parts.values() if p.default)
    assert shapes[""] == shapes[default.name]
    assert all(gpus == 0 and cpus >= 1 for cpus, gpus in shapes[default.name])
    assert sum(c for c, _ in shapes[default.name]) <= default.total_cpus
    launch = LaunchConfig(gpus_per_node=0)
    assert executors.settle_cpus_per_task(launch, 0, shapes)[0].startswith("1 (no GPUs")
    launch = LaunchConfig(gpus_per_node=1, partition=default.name)
    note, _ = executors.settle_cpus_per_task(launch, 0, shapes)
    assert launch.cpus_per_task == 1 and "no CPUs per GPU" in note
