"""Pretraining end to end: the real `avts train` CLI, real DeepSpeed with gloo processes, real
MP4 corpus, real MLflow stores (local file store and a tracking server).

One 2-process reference run is shared. The other runs resume from it or are compared to it:
kill during a save + resume=auto (bitwise same losses), 2 -> 1 and 1 -> 2 processes through
DeepSpeed's universal checkpoint, export without DeepSpeed, NaN injection with checkpoints on S3
from two ranks that share no staging folder (as nodes without a shared filesystem), on the MLflow
server. Faults are injected by the test-side hooks of ``tests/fixtures/train_hooks.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.fixtures import train_hooks
from tests.fixtures.in_process import avts

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "pretrain" / "quickstart.yaml"
SECRET = "SUPERSECRET-do-not-log"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def train_corpus(train_corpus_shared) -> str:
    # The session's training corpus (tests/fixtures/corpus.py TRAIN_CORPUS: enough held-out
    # clips for one full validation batch of 4), written once for every test that trains.
    return train_corpus_shared


def _config(tmp: Path, corpus: str) -> Path:
    """Quickstart with a 4-step easy stage (the test run crosses into the hard stage)."""
    path = tmp / "test_train.yaml"
    path.write_text(
        f"base: {QUICKSTART}\n"
        f"data: {{url: {corpus}, global_batch_size: 4, num_workers: 0}}\n"
        "curriculum:\n"
        "  stages:\n"
        "    - {name: easy, negative_mix: {easy: 1.0}, until_step: 4}\n"
        "    - {name: easy_hard, negative_mix: {easy: 0.5, hard: 0.5}}\n"
        "train: {max_steps: 8, log_every: 1, val_every_steps: 4, val_batches: 1, progress: false}\n"
        "checkpoint: {every_steps: 2, keep_last: 3}\n"
        "optim: {warmup_steps: 2}\n"
    )
    return path


def avts_train(cwd: Path, config: Path, *overrides: str, nproc: int = 1, hooks=()):
    """`avts train`, or with ``hooks`` (e.g. ``("--kill-at", "after_shards:6")``) its test-side
    stand-in that installs fault-injecting hooks into the same run_training. One process runs
    in this interpreter (a kill still gets a process of its own)."""
    if nproc == 1 and "--kill-at" not in hooks:
        argv = [*hooks, "--config", str(config)] if hooks else ["train", "--config", str(config)]
        return avts([*argv, *overrides], cwd=cwd, entry=train_hooks.main if hooks else None)
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    entry = ["tests.fixtures.train_hooks", *hooks] if hooks else ["avts_dist", "train"]
    cmd = [sys.executable, "-m", *entry, "--config", str(config)]
    cmd += ["--nproc", str(nproc), *overrides]
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=400)


def metrics(run_dir: Path) -> dict[int, dict]:
    lines = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [ln["step"] for ln in lines]
    assert steps == sorted(set(steps)), f"steps repeated or out of order: {steps}"
    return {ln["step"]: ln for ln in lines}


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (
        f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )


@pytest.fixture(scope="module")
def ref_run(tmp_path_factory, train_corpus):
    """The uninterrupted 2-process reference: 8 steps, checkpoints every 2 (keep 3)."""
    work = tmp_path_factory.mktemp("ref")
    cfg = _config(work, train_corpus)
    proc = avts_train(
        work, cfg, "run.name=ref", f"checkpoint.storage_options.secret_access_key={SECRET}",
        nproc=2,
    )  # fmt: skip
    _ok(proc)
    return {"work": work, "cfg": cfg, "run_dir": work / "runs" / "ref", "proc": proc}


def test_two_process_training(ref_run):
    run_dir = ref_run["run_dir"]
    m = metrics(run_dir)
    assert sorted(m) == list(range(1, 9))
    for step, line in m.items():
        assert line["samples_seen"] == 4 * step
        assert {"epoch", "loss", "lr"} <= set(line)
    assert m[8]["loss"] < m[1]["loss"]
    # Validation at steps 4 and 8, and the curriculum moved to the hard stage at step 4.
    assert "val/sync_acc_easy" in m[4] and "val/sync_acc_hard" in m[8]
    assert not any(k.startswith("val/acc") for k in m[4])  # one name per metric
    assert m[4]["curriculum"][0]["to_stage"] == "easy_hard"
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == [
        "step_000004", "step_000006", "step_000008",
    ]  # fmt: skip
    assert (ckpts / "latest").read_text() == "step_000008"
    meta = json.loads((ckpts / "step_000008" / "COMPLETE").read_text())
    assert meta["world_size"] == 2 and meta["step"] == 8
    assert len(list((ckpts / "step_000008").glob("zero_pp_rank_*_optim_states.pt"))) == 2
    # The manifest names every rank's files with their sizes and sha256, as they are on disk.
    tag_dir = ckpts / "step_000008"
    assert {n for n in meta["files"] if n.startswith("rng_rank_")} == {
        "rng_rank_00000.pt", "rng_rank_00001.pt",
    }  # fmt: skip
    on_disk = {
        p.name: {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        for p in tag_dir.iterdir()
        if p.name != "COMPLETE"
    }
    assert meta["files"] == on_disk
    assert (run_dir / "config.yaml").is_file()
    # MLflow, local store: params from the resolved config, credentials redacted everywhere.
    from mlflow import MlflowClient

    from avts_dist.tracking import tracking_uri_for

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    client = MlflowClient(tracking_uri_for(str(ref_run["work"] / "mlruns")))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["data.global_batch_size"] == "4"
    assert run.data.params["checkpoint.storage_options.secret_access_key"] == "<redacted>"
    assert SECRET not in json.dumps(run.data.params) + json.dumps(run.data.tags)
    assert SECRET not in ref_run["proc"].stdout + ref_run["proc"].stderr
    history = client.get_metric_history(run_id, "loss")
    assert sorted(h.step for h in history) == list(range(1, 9))
    assert "val/sync_acc_easy" in run.data.metrics


def test_kill_during_save_then_resume_is_bitwise_identical(ref_run, tmp_path):
    cfg = ref_run["cfg"]
    # SIGKILL on both ranks after the step-6 shards are written, before it is published.
    killed = avts_train(
        tmp_path, cfg, "run.name=kill", nproc=2, hooks=("--kill-at", "after_shards:6")
    )
    assert killed.returncode != 0
    run_dir = tmp_path / "runs" / "kill"
    ckpts = run_dir / "checkpoints"
    assert (ckpts / ".tmp-step_000006").is_dir()  # the half-written save
    assert (ckpts / "latest").read_text() == "step_000004"
    run_id = (run_dir / "mlflow_run_id").read_text().strip()

    resumed = avts_train(tmp_path, cfg, "run.name=kill", "resume=auto", nproc=2)
    _ok(resumed)
    assert not (ckpts / ".tmp-step_000006").exists()
    ref, got = metrics(ref_run["run_dir"]), metrics(run_dir)
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert got[step]["loss"] == ref[step]["loss"], f"step {step} differs"
        assert got[step]["lr"] == ref[step]["lr"]
    assert got[8]["val/sync_acc_hard"] == ref[8]["val/sync_acc_hard"]
    # The same MLflow run continues.
    assert (run_dir / "mlflow_run_id").read_text().strip() == run_id
    from mlflow import MlflowClient

    from avts_dist.tracking import tracking_uri_for

    client = MlflowClient(tracking_uri_for(str(tmp_path / "mlruns")))
    assert client.get_run(run_id).info.status == "FINISHED"
    assert max(h.step for h in client.get_metric_history(run_id, "loss")) == 8
    assert client.get_run(run_id).data.tags["avts.resumed_from"].endswith("step_000004")


def test_elastic_resume_two_to_one_and_back(ref_run, tmp_path):
    cfg = ref_run["cfg"]
    src = tmp_path / "from_ref"
    shutil.copytree(ref_run["run_dir"] / "checkpoints" / "step_000004", src / "step_000004")
    # 2 -> 1 process: DeepSpeed's universal checkpoint, same global batch.
    one = avts_train(tmp_path, cfg, "run.name=one", f"resume={src / 'step_000004'}", nproc=1)
    _ok(one)
    assert (src / "step_000004_universal" / "zero").is_dir()
    ref, got = metrics(ref_run["run_dir"]), metrics(tmp_path / "runs" / "one")
    assert sorted(got) == [5, 6, 7, 8]
    for step in range(5, 9):
        # Same samples, same global batch, same LR schedule position. The loss is close, not
        # equal: BatchNorm normalises each rank's half-batch separately at 2 processes (and
        # reductions run in another order). Fresh weights would give ~1.8 here.
        assert got[step]["samples_seen"] == ref[step]["samples_seen"]
        assert got[step]["lr"] == ref[step]["lr"]
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=5e-2)
    meta = json.loads((tmp_path / "runs/one/checkpoints/step_000008/COMPLETE").read_text())
    assert meta["world_size"] == 1
    run_id = (tmp_path / "runs/one/mlflow_run_id").read_text().strip()

    # 1 -> 2 processes, continuing the 1-process run to step 10; the reference continues its own
    # (2-process) step-8 checkpoint to step 10 alongside, on the same samples.
    two = avts_train(tmp_path, cfg, "run.name=one", "resume=auto", "train.max_steps=10", nproc=2)
    _ok(two)
    ref8 = ref_run["run_dir"] / "checkpoints" / "step_000008"
    cont = avts_train(
        tmp_path, cfg, "run.name=ref10", f"resume={ref8}", "train.max_steps=10", nproc=2
    )
    _ok(cont)
    got, ref10 = metrics(tmp_path / "runs" / "one"), metrics(tmp_path / "runs" / "ref10")
    assert sorted(got) == list(range(5, 11)) and sorted(ref10) == [9, 10]
    for step in (9, 10):
        # The universal checkpoint carried the trained weights, optimizer and LR position: the
        # continuation tracks the reference's (fresh weights would be ~1.8 above it).
        assert got[step]["samples_seen"] == ref10[step]["samples_seen"] == 4 * step
        assert got[step]["lr"] == ref10[step]["lr"]
        assert got[step]["loss"] == pytest.approx(ref10[step]["loss"], rel=5e-2)
        assert got[step]["epoch"] == ref10[step]["epoch"]
    assert got[9]["loss"] < ref[1]["loss"] - 0.5
    assert (tmp_path / "runs/one/mlflow_run_id").read_text().strip() == run_id
    meta = json.loads((tmp_path / "runs/one/checkpoints/step_000010/COMPLETE").read_text())
    assert meta["world_size"] == 2


def test_export_loads_without_deepspeed(ref_run, tmp_path):
    from avts_dist.cli import main

    out = tmp_path / "model.pt"
    assert (
        main(["export", "--checkpoint", str(ref_run["run_dir"] / "checkpoints"), "--out", str(out)])
        == 0
    )
    code = (
        "import sys, torch\n"
        f"p = torch.load({str(out)!r}, weights_only=True)\n"
        "assert 'deepspeed' not in sys.modules\n"
        "from avts_dist.export import load_pretrained\n"
        f"v = load_pretrained({str(out)!r}, part='video'); a = load_pretrained({str(out)!r}, part='audio')\n"
        "assert 'deepspeed' not in sys.modules\n"
        "print(p['step'], p['format_version'], sorted(p))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )  # fmt: skip
    _ok(proc)
    assert proc.stdout.startswith("8 1 ")
    payload = torch.load(out, weights_only=True)
    # The exported weights are the checkpoint's (consolidated from the 2 ZeRO shards).
    from avts_dist.export.consolidate import consolidated_state_dict

    state, _ = consolidated_state_dict(ref_run["run_dir"] / "checkpoints", "step_000008")
    for key, value in payload["video"].items():
        assert torch.equal(value, state[f"video.{key}"]), key
    for key, value in payload["heads"].items():
        assert torch.equal(value, state[f"heads.{key}"]), key
    assert all(v.dtype != torch.bfloat16 for v in payload["audio"].values())

    bad = main(["export", "--checkpoint", str(tmp_path / "nothing"), "--out", str(out)])
    assert bad == 2


def test_nan_injection_then_resume_from_s3_without_shared_staging(
    ref_run, tmp_path, mlflow_server, s3_bucket
):
    """NaN steps are skipped; 3 in a row stop the run, with the last good checkpoint on S3
    (moto server) as `latest` and the state it stopped on kept under a quarantined name, logged
    to a real MLflow server; the run then resumes from S3 and finishes. The two ranks stage their
    files in folders of their own (``$RANK``), as nodes without a shared filesystem: each uploads
    its own files, COMPLETE lists both ranks', and to resume each downloads its copy.
    """
    cfg = ref_run["cfg"]
    remote = f"s3://{s3_bucket}/ckpt"
    common = (
        "run.name=nan", f"tracking.uri={mlflow_server}", f"checkpoint.dir={remote}",
        f"checkpoint.staging_dir={tmp_path}/stage_$RANK",
    )  # fmt: skip
    proc = avts_train(
        tmp_path, cfg, *common, "train.max_nonfinite_steps=3", nproc=2,
        hooks=("--nan-at", "3,5,6,7"),
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert "non-finite loss" in proc.stderr
    assert "latest stays step_000004, the last good checkpoint" in proc.stderr
    assert "kept for debugging as step_000007.quarantined-nonfinite" in proc.stderr
    run_dir = tmp_path / "runs" / "nan"
    m = metrics(run_dir)
    assert sorted(m) == list(range(1, 8))
    for step in (3, 5, 6, 7):
        assert m[step]["skipped_step"] is True and m[step]["loss"] is None
    assert m[4]["loss"] is not None and m[7]["num_skipped_steps"] == 4
    assert m[5]["lr"] == m[6]["lr"] == m[7]["lr"]  # skipped steps leave the LR schedule alone
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    assert fs.cat_file(f"{s3_bucket}/ckpt/latest") == b"step_000004"
    assert fs.exists(f"{s3_bucket}/ckpt/step_000007.quarantined-nonfinite/COMPLETE")
    assert not fs.exists(f"{s3_bucket}/ckpt/step_000006")  # a skipped step is not published
    meta = json.loads(fs.cat_file(f"{s3_bucket}/ckpt/step_000004/COMPLETE"))
    assert meta["step"] == 4
    remote_sizes = {
        p.rsplit("/", 1)[1]: info["size"]
        for p, info in fs.find(f"{s3_bucket}/ckpt/step_000004", detail=True).items()
        if not p.endswith("COMPLETE")
    }
    assert {name: entry["size"] for name, entry in meta["files"].items()} == remote_sizes
    assert all(len(entry["sha256"]) == 64 for entry in meta["files"].values())
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
            "rng_rank_00000.pt", "rng_rank_00001.pt", "mp_rank_00_model_states.pt"} == set(meta["files"])  # fmt: skip
    # Each staging folder held only its rank's part: dropped once the upload was confirmed.
    for rank in (0, 1):
        assert not (tmp_path / f"stage_{rank}" / "step_000004").exists()
    # The tracking server holds the run, marked failed, with metrics and redacted params.
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.params["run.name"] == "nan"
    assert {h.step for h in client.get_metric_history(run_id, "loss")} == {1, 2, 4}
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert "config.yaml" in artifacts and "checkpoints" in artifacts

    # Resume from S3: every rank's filesystem fetches the whole checkpoint.
    resumed = avts_train(tmp_path, cfg, *common, "resume=auto", nproc=2)
    _ok(resumed)
    for rank in (0, 1):
        fetched = tmp_path / f"stage_{rank}" / "step_000004"
        assert set(json.loads((fetched / "COMPLETE").read_text())["files"]) == set(meta["files"])
    m = metrics(run_dir)
    assert sorted(m) == list(range(1, 9)) and m[8]["loss"] is not None
    assert fs.cat_file(f"{s3_bucket}/ckpt/latest") == b"step_000008"
    assert client.get_run(run_id).info.status == "FINISHED"
    # Export reads the checkpoint straight from S3.
    from avts_dist.cli import main

    out = tmp_path / "from_s3.pt"
    assert main(["export", "--checkpoint", remote, "--out", str(out)]) == 0
    assert torch.load(out, weights_only=True)["step"] == 8


def test_preemption_signal_saves_and_exits_75(ref_run, tmp_path):
    """SIGUSR2 (SLURM's warning signal) to `avts train`: every rank stops at the next step
    boundary after a checkpoint; exit status 75, MLflow run marked KILLED."""
    import signal
    import time

    cmd = [sys.executable, "-m", "avts_dist", "train", "--config", str(ref_run["cfg"])]
    cmd += ["run.name=pre", "train.max_steps=500", "checkpoint.every_steps=0"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics_file = tmp_path / "runs" / "pre" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.5)
    proc.send_signal(signal.SIGUSR2)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 75, err[-3000:]
    assert "preempted by signal" in err
    last = max(metrics(tmp_path / "runs" / "pre"))
    assert 3 <= last < 500
    ckpts = tmp_path / "runs" / "pre" / "checkpoints"
    assert (ckpts / "latest").read_text() == f"step_{last:06d}"
    assert json.loads((ckpts / f"step_{last:06d}" / "COMPLETE").read_text())["step"] == last
    from mlflow import MlflowClient

    from avts_dist.tracking import tracking_uri_for

    run_id = (tmp_path / "runs" / "pre" / "mlflow_run_id").read_text().strip()
    client = MlflowClient(tracking_uri_for(str(tmp_path / "mlruns")))
    assert client.get_run(run_id).info.status == "KILLED"
