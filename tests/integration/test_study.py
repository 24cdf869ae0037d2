"""`avts study` end to end on configs/study/smoke.yaml (2 arms x 1 seed, 4 steps): real
pretrainings (DeepSpeed, gloo), real evaluations, a real MLflow store; `--cluster debug` in this
process, `--cluster local` on the real local SLURM cluster as job arrays.

The low-label evaluation (`avts eval lowlabel`) is another helper's job; until it is registered
the smoke study runs without it (a line in the test output says so)."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from avts_dist.config import REPO_ROOT
from eval.registry import JOBS
from tests.fixtures.in_process import avts

pytestmark = pytest.mark.slow

SMOKE = str(REPO_ROOT / "configs" / "study" / "smoke.yaml")
HAS_LOWLABEL = "lowlabel" in JOBS
EVALS = {"sync", "lowlabel_rhythm"} if HAS_LOWLABEL else {"sync"}


def study(work, *args: str, status: int = 0) -> subprocess.CompletedProcess:
    """`avts study` on the smoke config, in this interpreter (tests/fixtures/in_process.py):
    `--cluster debug` runs its pretrainings and evaluations in the calling process anyway, and a
    fresh interpreter per call imported torch, DeepSpeed and MLflow again (6 calls here)."""
    argv = ["study", "--config", SMOKE]
    argv += ["--runs", str(work / "runs"), "--tracking-uri", str(work / "mlruns"), *args]
    argv += [f"corpus.out={work / 'data'}"]
    if not HAS_LOWLABEL:
        print("`lowlabel` is not a registered evaluation yet: the smoke study runs sync only")
        argv.append("evals.lowlabel_rhythm.arms=[]")
    proc = avts(argv, cwd=work)
    assert proc.returncode == status, f"{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    return proc


def study_runs(work) -> list:
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=(work / "mlruns").as_uri())
    exp = client.get_experiment_by_name("smoke")
    return client.search_runs([exp.experiment_id], "tags.`avts.study` = 'smoke'")


def check_grouped(work, earlier_failure: bool = False) -> None:
    runs = study_runs(work)
    if earlier_failure:  # a failed attempt's run stays, FAILED; readers take FINISHED runs
        runs = [r for r in runs if r.info.status == "FINISHED"]
    by_kind = {}
    for r in runs:
        t = r.data.tags
        assert r.info.status == "FINISHED"
        assert t["avts.pretrain_seed"] == "0"
        by_kind.setdefault(t["avts.kind"], set()).add((t["avts.arm"], t.get("avts.study_eval")))
    assert by_kind["pretrain"] == {("avts", None), ("avts_no_curriculum", None)}
    expected = {("avts", "sync"), ("avts_no_curriculum", "sync")}
    if HAS_LOWLABEL:
        expected.add(("avts", "lowlabel_rhythm"))
    assert by_kind["eval"] == expected
    # Evaluations are child runs of their own pretraining.
    parents = {
        r.info.run_id: r.data.tags["avts.arm"]
        for r in runs
        if r.data.tags["avts.kind"] == "pretrain"
    }
    for r in runs:
        if r.data.tags["avts.kind"] == "eval":
            assert parents[r.data.tags["mlflow.parentRunId"]] == r.data.tags["avts.arm"]


@pytest.fixture(scope="module")
def debug_study(tmp_path_factory):
    work = tmp_path_factory.mktemp("study_debug")
    return work, study(work, "--cluster", "debug")


def test_debug_study_runs_grid_grouped_in_mlflow(debug_study):
    work, proc = debug_study
    assert "avts/p0                                  COMPLETED" in proc.stdout
    check_grouped(work)
    for arm in ("avts", "avts_no_curriculum"):
        assert (work / "runs" / f"{arm}_p0" / "eval" / "sync" / "sync" / "metrics.json").exists()
    if HAS_LOWLABEL:
        lowlabel = work / "runs" / "avts_p0" / "eval" / "lowlabel_rhythm" / "lowlabel"
        assert (lowlabel / "lowlabel.json").exists()


def test_debug_study_rerun_reuses_and_redoes_only_what_is_missing(debug_study):
    work, _ = debug_study
    ckpt_marker = sorted((work / "runs" / "avts_p0" / "checkpoints").glob("step_*/COMPLETE"))[-1]
    before = ckpt_marker.stat().st_mtime_ns
    # An interrupted evaluation: its results never written.
    (work / "runs" / "avts_no_curriculum_p0" / "eval" / "sync" / "sync" / "metrics.json").unlink()
    proc = study(work, "--cluster", "debug")
    assert re.search(r"pretrain avts/p0 +reused", proc.stdout)
    assert re.search(r"pretrain avts_no_curriculum/p0 +reused", proc.stdout)
    assert "avts_no_curriculum/p0/sync               COMPLETED" in proc.stdout
    assert "avts/p0/sync                             reused" in proc.stdout
    assert "running in-process" not in proc.stderr  # no pretraining ran again
    assert ckpt_marker.stat().st_mtime_ns == before
    # The redone evaluation is one more run in the same group; the failed-or-missing one's
    # metrics file is back.
    syncs = [r for r in study_runs(work) if r.data.tags.get("avts.study_eval") == "sync"]
    assert len(syncs) == 3


def test_reuse_never_takes_results_made_with_other_settings(debug_study):
    """Each run dir records what made it (study_record.json). Changed evaluation overrides run
    that evaluation again and nothing else; a pretraining made with other settings is one
    error line, not a silent reuse or resume, and nothing is touched."""
    work, _ = debug_study
    runs = work / "runs"
    for arm in ("avts", "avts_no_curriculum"):
        assert (runs / f"{arm}_p0" / "study_record.json").exists()
        assert (runs / f"{arm}_p0" / "eval" / "sync" / "study_record.json").exists()
    changed = "evals.sync.overrides=[eval.sync.max_clips=6, eval.batch_size=4]"
    dry = study(work, "--cluster", "debug", "--dry-run", changed)
    stale = r"eval sync +\(sync\) to run \(its results were made with other overrides\)"
    assert len(re.findall(stale, dry.stdout)) == 2, dry.stdout
    assert re.search(r"pretrain avts/p0 +reused", dry.stdout)
    if HAS_LOWLABEL:
        assert re.search(r"eval lowlabel_rhythm +\(lowlabel\) reused", dry.stdout)
    marker = sorted((runs / "avts_p0" / "checkpoints").glob("step_*/COMPLETE"))[-1]
    before = marker.stat().st_mtime_ns
    bad = study(work, "--cluster", "debug", "--dry-run", "arms.avts.overrides=[optim.lr=0.002]",
                status=2)  # fmt: skip
    assert "arms.avts" in bad.stderr and "optim.lr" in bad.stderr, bad.stderr
    assert "nothing was changed" in bad.stderr
    # Run it: the two sync evaluations again, with the new overrides; the rest reused.
    proc = study(work, "--cluster", "debug", changed)
    assert "avts/p0/sync                             COMPLETED" in proc.stdout
    assert "avts_no_curriculum/p0/sync               COMPLETED" in proc.stdout
    assert "running in-process" not in proc.stderr
    assert marker.stat().st_mtime_ns == before
    record = (runs / "avts_p0" / "eval" / "sync" / "study_record.json").read_text()
    assert "eval.sync.max_clips=6" in record
    again = study(work, "--cluster", "debug", "--dry-run", changed)
    assert "nothing to run: every pretraining and evaluation is reused" in again.stdout


def test_local_slurm_study_arrays_dependencies_failure_and_reuse(tmp_path, slurm_cluster):
    from launch.jobs import job_states

    # 1. One pretraining fails (its checkpoint folder cannot be created): the other pretraining
    # and its evaluations go on; the failed one's evaluation element is cancelled, not run.
    broken = "arms.avts_no_curriculum.overrides=[checkpoint.dir=/proc/avts-not-writable]"
    proc = study(tmp_path, "--cluster", "local", broken, status=1)
    ids = {k: v for v, k in re.findall(r"submitted job array (\d+) \(smoke-(\w+),", proc.stderr)}
    assert set(ids) == {"pretrain", "eval"}
    pre = {i["ArrayTaskId"]: i for i in job_states(ids["pretrain"])}
    ev = {i["ArrayTaskId"]: i for i in job_states(ids["eval"])}
    # Array elements visible to SLURM (no accounting database here: scontrol, not sacct).
    assert set(pre) == set(ev) == {"0", "1"}
    assert pre["0"]["ArrayJobId"] == ids["pretrain"]
    assert [pre[t]["JobState"] for t in "01"] == ["COMPLETED", "FAILED"]
    assert [ev[t]["JobState"] for t in "01"] == ["COMPLETED", "CANCELLED"]
    # Per element: evaluation 0 started only after pretraining 0 ended; 1 never started.
    assert ev["0"]["StartTime"] >= pre["0"]["EndTime"]
    assert "avts_no_curriculum/p0/sync               NOT RUN (pretraining failed)" in proc.stdout
    assert "1 failed" not in proc.stderr and "2 failed: avts_no_curriculum/p0" in proc.stderr

    # 2. Fixed and run again: only the failed pretraining and its evaluation run.
    again = study(tmp_path, "--cluster", "local")
    assert re.search(r"pretrain avts/p0 +reused", again.stdout)
    assert "job array smoke-pretrain: 1 element(s): 0=avts_no_curriculum/p0" in again.stdout
    check_grouped(tmp_path, earlier_failure=True)

    # 3. Everything done: nothing is submitted.
    last = study(tmp_path, "--cluster", "local")
    assert "nothing to run: every pretraining and evaluation is reused" in last.stdout
    assert "submitted job array" not in last.stderr

    # 4. A study still in SLURM (submitted with --no-wait) is not submitted twice.
    from launch.study import jobs_in_slurm

    study(tmp_path, "--cluster", "local", "--no-wait", "seeds=[1]")
    folder = tmp_path / "runs" / "slurm"
    submitted = jobs_in_slurm(folder)
    try:
        assert submitted
        twice = study(tmp_path, "--cluster", "local", "seeds=[1]", status=2)
        assert "still has SLURM jobs" in twice.stderr
        assert "submitted job array" not in twice.stderr
    finally:
        subprocess.run(["scancel", *{j.split("_")[0] for j in submitted}], check=False)
