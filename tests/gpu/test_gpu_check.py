"""The GPU check (``make gpu-check``, tests/gpu/gpu_check.py). On a GPU machine it runs for real.
On CPU the subject is the check itself: a stage that fails, hangs or cannot import turns into a
non-zero exit with the reason in the JSON, the JSON is there while a stage runs, and a dry run
(toy sizes, every stage) keeps the stages' code working."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
NO_GPU = "skipped: no GPU (CUDA is not available here); the GPU check measures nothing on CPU"
NO_GPU_LINE = "gpu-check: skipped: no GPU (CUDA is not available here); nothing was measured"
CHECK = [sys.executable, "-m", "tests.gpu.gpu_check"]
DRY = ["--device", "cpu", "--dry-run"]


def _env(tmp_path: Path | None = None, *, blocked: tuple[str, ...] = ()) -> dict:
    """The caller's environment; with ``blocked``, a sitecustomize on PYTHONPATH that makes
    those imports fail (the repository is NOT on this PYTHONPATH: the check puts it first)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    if blocked:
        blocker = tmp_path / "blocker"
        blocker.mkdir()
        (blocker / "sitecustomize.py").write_text(
            "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in blocked)
        )
        env["PYTHONPATH"] = str(blocker)
    return env


def gpu_check(*args: str, timeout: int = 900, env: dict | None = None):
    return subprocess.run([*CHECK, *args], cwd=REPO, env=env or _env(), capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def stages(path: Path) -> dict:
    return json.loads(path.read_text())["stages"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
@pytest.mark.slow
def test_gpu_check_on_the_gpu(tmp_path):  # pragma: no cover - GPU machines
    proc = gpu_check("--out", str(tmp_path / "gpu.json"), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = stages(tmp_path / "gpu.json")
    assert all(s["status"] == "passed" for s in report.values()), report
    assert len(report["nets"]["value"]) == 6 and all(r["mfu"] > 0 for r in report["nets"]["value"])
    assert report["trainer"]["value"]["host_syncs"]["num_steps"] == 39


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the real check runs")
def test_without_a_gpu_it_exits_3_with_one_line(tmp_path):
    proc = gpu_check("--out", str(tmp_path / "gpu.json"))
    assert proc.returncode == 3
    assert proc.stdout == "" and proc.stderr.splitlines() == [NO_GPU_LINE]
    assert not (tmp_path / "gpu.json").exists()
    # Through make, with the GPU hidden: the check's one line; make itself can only say
    # "Error 3" and exit 2 (GNU make's status for any failed recipe).
    env = dict(_env(), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(["make", "-s", "gpu-check"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert lines[0] == NO_GPU_LINE and len(lines) == 2 and lines[1].endswith("Error 3"), lines


def test_a_failing_stage_is_recorded_and_the_rest_still_runs(tmp_path):
    out = tmp_path / "check.json"
    fail = "import sys; print('boom: the matmul went wrong', file=sys.stderr); sys.exit(7)"
    proc = gpu_check(*DRY, "--only", "peak,nets", "--out", str(out),
                     "--stage-command", f"peak={fail}", "--stage-command", "nets=pass")  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = stages(out)
    assert report["peak"]["status"] == "failed"
    assert report["peak"]["reason"] == "exit status 7: boom: the matmul went wrong"
    assert report["nets"]["status"] == "passed"
    assert "NOT PASSED: peak failed" in proc.stdout
    assert json.loads(out.read_text())["passed"] is False


def test_a_hanging_stage_times_out_with_everything_it_started(tmp_path):
    out, pid_file = tmp_path / "check.json", tmp_path / "sleeper.pid"
    hang = (
        "import subprocess, pathlib; p = subprocess.Popen(['sleep', '600']); "
        f"pathlib.Path({str(pid_file)!r}).write_text(str(p.pid)); p.wait()"
    )
    # A budget of 288 s gives peak 12 s and nets 60 s (shares 20 and 100 of 480): room for a
    # loaded machine to start the stage's interpreter and its sleeper before the timeout.
    t0 = time.monotonic()
    proc = gpu_check(*DRY, "--only", "peak,nets", "--budget-s", "288", "--out", str(out),
                     "--stage-command", f"peak={hang}", "--stage-command", "nets=pass")  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert time.monotonic() - t0 < 300  # not the 600 s the stage would hang
    report = stages(out)
    assert report["peak"]["status"] == "failed" and report["peak"]["timeout_s"] == 12.0
    assert report["peak"]["reason"] == "timed out after 12 s"
    assert report["nets"]["status"] == "passed" and report["nets"]["timeout_s"] == 60.0
    # Killed with the stage's process group. Its parent died with it, so it is reparented and
    # may stay a zombie (killed, not yet reaped) for a moment: a zombie counts as gone.
    sleeper = int(pid_file.read_text())
    deadline = time.monotonic() + 30
    while _running(sleeper) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _running(sleeper), f"the stage's child {sleeper} outlived its stage"


def _running(pid: int) -> bool:
    """A live process (not a zombie) with this pid."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def failed_with_blocked(tmp_path: Path, stage: str, module: str) -> dict:
    """The dry-run check of ``stage`` alone with ``import module`` failing: exit 1, the stage
    failed; its JSON entry."""
    out = tmp_path / "check.json"
    env = _env(tmp_path, blocked=(module,))
    proc = gpu_check(*DRY, "--only", stage, "--out", str(out), env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    entry = stages(out)[stage]
    assert entry["status"] == "failed"
    return entry


def test_a_stage_that_cannot_import_fails_with_the_import_error(tmp_path):
    nets = failed_with_blocked(tmp_path, "nets", "avts_dist.models.video")
    assert nets["reason"].startswith("exit status 1: ModuleNotFoundError: import of "
                                     "avts_dist.models.video halted")  # fmt: skip
    assert "in build_net" in nets["error"]  # the error keeps the traceback's last lines


def test_a_skipped_stage_is_not_a_pass(tmp_path):
    out = tmp_path / "check.json"
    # Without the decoder stage the trainer's decoder is PyAV, so nvdec has nothing to measure.
    proc = gpu_check(*DRY, "--only", "nvdec", "--out", str(out))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert stages(out)["nvdec"] == {
        "elapsed_s": stages(out)["nvdec"]["elapsed_s"], "timeout_s": 40.0, "status": "skipped",
        "reason": "torchcodec does not load here (the decoder stage chose PyAV)",
    }  # fmt: skip


def test_the_json_shows_a_running_stage_when_the_check_is_killed(tmp_path):
    out = tmp_path / "check.json"
    check = subprocess.Popen(
        [*CHECK, *DRY, "--only", "peak,nets", "--out", str(out), "--stage-command", "peak=pass",
         "--stage-command", "nets=import time; time.sleep(600)"],
        # Its temporary folder in tmp_path: a check killed outright cannot remove it.
        cwd=REPO, env=dict(_env(), TMPDIR=str(tmp_path)), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if out.exists() and "nets" in stages(out):
                break
            time.sleep(0.2)
    finally:
        os.killpg(check.pid, signal.SIGKILL)  # as a command limit would
        check.wait()
    report = stages(out)
    assert report["peak"]["status"] == "passed"
    assert report["nets"] == {"status": "running", "timeout_s": 100.0}
    # What the killed check left is in tmp_path (not in /tmp): the running stage's log with it.
    (left,) = tmp_path.glob("avts-gpu-check-*")
    assert (left / "nets.log").exists()


def test_the_trainer_keeps_the_callers_pythonpath(tmp_path):
    """The stages get the repository first on PYTHONPATH and the caller's entries after it: a
    blocker there still blocks deepspeed in the trainer (two processes down), which replacing
    PYTHONPATH would lose."""
    trainer = failed_with_blocked(tmp_path, "trainer", "deepspeed")
    assert trainer["reason"] == (
        "exit status 1: RuntimeError: avts train (train) exited 1: [rank0]: "
        "ModuleNotFoundError: No module named 'deepspeed.comm'; 'deepspeed' is not a package"
    )


@pytest.mark.slow
def test_dry_run_exercises_every_stage(tmp_path):
    # As on the GPU machine: no mlflow, no submitit (the trainer runs with tracking off).
    env = _env(tmp_path, blocked=("mlflow", "submitit"))
    proc = gpu_check(*DRY, "--budget-s", "1800", "--out", str(tmp_path / "dry.json"), env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "dry.json").read_text())
    stage = {name: s.get("value") for name, s in report["stages"].items()}
    assert report["dry_run"] is True and report["passed"] is True
    assert list(stage) == ["decoder", "peak", "nets", "conv3d_agreement", "trainer", "nvdec"]
    assert report["video_decoder"]["video_decoder"] == "torchcodec"  # the CPU pin loads here
    assert stage["peak"] > 0
    combos = {(r["arch"], r["dtype"], r["layout"]) for r in stage["nets"]}
    assert len(combos) == 6  # 3 nets x {fp32, bf16}, in the layout the trainer runs
    assert all(r["clips_per_s"] > 0 and math.isfinite(r["mfu"]) for r in stage["nets"])
    conv = stage["conv3d_agreement"]
    assert conv["batches"] == [2, 3] and conv["num_shapes"] > 3
    assert conv["pass"] and 0 < conv["max_rel_err_bf16"] < 0.02
    trainer = stage["trainer"]
    assert trainer["train_returncode"] == 0 and trainer["resume_returncode"] == 0
    assert trainer["accumulate_returncode"] == 0  # deepspeed.grad_accum_steps=2, global negatives
    assert trainer["pass"] and trainer["resumed_steps"] == [4, 5, 6, 7, 8]
    assert trainer["video_decoder"] == "torchcodec"
    assert 0 <= trainer["data_wait_fraction"] <= 1 and trainer["clips_per_s"] > 0
    assert trainer["host_syncs"]["num_steps"] == 1 and trainer["project_host_syncs_per_step"] >= 1
    assert stage["nvdec"]["pass"] and stage["nvdec"]["cpu_clips_per_s"] > 0
