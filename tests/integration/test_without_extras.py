"""Training without the extras: in a process where ``import mlflow`` (or ``import submitit``)
fails, a run with tracking off trains to the end, and a command that needs the missing package
stops at start in one line that names the fix (avts_dist/extras.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from avts_dist.config import REPO_ROOT

QUICKSTART = REPO_ROOT / "configs" / "pretrain" / "quickstart.yaml"


def _blocked_env(tmp_path: Path, *packages: str) -> dict:
    """An environment whose sitecustomize makes ``import <package>`` fail, as on a machine
    without it (a None entry in sys.modules is Python's own "not importable" marker)."""
    blocker = tmp_path / "blocker"
    blocker.mkdir(exist_ok=True)
    (blocker / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{p!r}] = None\n" for p in packages)
    )
    path = os.pathsep.join([str(blocker), str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=path.rstrip(os.pathsep), OMP_NUM_THREADS="1")


def _avts(env: dict, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "avts_dist", *args], env=env, cwd=cwd,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_the_blocker_blocks(tmp_path):
    env = _blocked_env(tmp_path, "mlflow")
    proc = subprocess.run([sys.executable, "-c", "import mlflow"], env=env, capture_output=True,
                          text=True)  # fmt: skip
    assert proc.returncode == 1 and "ModuleNotFoundError" in proc.stderr


def test_training_with_tracking_off_needs_no_mlflow(tmp_path, synth_corpus):
    env = _blocked_env(tmp_path, "mlflow")
    run_dir = tmp_path / "run"
    proc = _avts(
        env, "train", "--config", str(QUICKSTART), f"run.dir={run_dir}", f"data.url={synth_corpus}",
        "data.global_batch_size=2", "data.num_workers=0", "train.max_steps=3", "train.log_every=1",
        "train.val_every_steps=0", "train.progress=false", "checkpoint.every_steps=3",
        "tracking.enabled=false", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "avts train: completed at step 3" in proc.stdout
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").open()]
    assert steps == [1, 2, 3]
    assert not (tmp_path / "mlruns").exists()


def test_tracking_on_without_mlflow_stops_at_start_in_one_line(tmp_path, synth_corpus):
    env = _blocked_env(tmp_path, "mlflow")
    for nproc in ("1", "2"):  # in the rank, and before --nproc starts any
        proc = _avts(
            env, "train", "--config", str(QUICKSTART), f"run.dir={tmp_path / 'run'}",
            f"data.url={synth_corpus}", "train.max_steps=2", "--nproc", nproc, cwd=tmp_path,
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr[-3000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert lines[0].startswith("avts train: error: tracking.enabled=true needs the mlflow")
        assert "pip install mlflow, or set tracking.enabled=false" in lines[0]
        assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_launch_without_submitit_is_one_line(tmp_path):
    env = _blocked_env(tmp_path, "submitit")
    proc = _avts(
        env, "launch", "pretrain", "--config", str(QUICKSTART), "--cluster", "local", "--dry-run",
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "avts launch: error: avts launch needs the submitit package, which does not import here "
        "(import of submitit halted; None in sys.modules); pip install submitit"
    )


def test_deepspeed_imports_without_mlflow_and_mlflow_imports_after(tmp_path):
    """DeepSpeed's autotuner tries ``import mlflow`` (seconds): import_deepspeed hides it in a
    process that has not imported mlflow, and takes the marker away again right after."""
    code = (
        "import sys; from avts_dist.extras import import_deepspeed; "
        "ds = import_deepspeed(); from deepspeed.autotuning import autotuner; "
        "print('mlflow' in sys.modules, autotuner.has_mlflow, import_deepspeed() is ds); "
        "import mlflow; print(type(mlflow.MlflowClient).__name__)"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["False", "False", "True", "type"], proc.stdout
