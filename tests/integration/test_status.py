"""`avts status` on a real finished run (the shared tiny `avts train`), on a run directory that a
writer is appending to, and on a copy of the real run in S3 (moto server)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from avts_dist.cli import main
from avts_dist.config import load_config, save_config
from avts_dist.status import format_status, read_status
from tests.fixtures.tiny_run import TINY_RUN_STAGE_STEP, TINY_RUN_STEPS

pytestmark = pytest.mark.slow


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_status_of_a_finished_training_run(tiny_run, capsys):
    run_dir = tiny_run["run_dir"]
    assert main(["status", str(run_dir), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    lines = _metrics(run_dir)
    assert st["state"] == "finished" and st["mlflow_status"] == "FINISHED"
    assert st["step"] == st["total_steps"] == TINY_RUN_STEPS == lines[-1]["step"]
    assert st["eta_s"] == 0.0
    # 14 training clips at global batch 2; the trainer's own epoch count agrees at step 7.
    assert st["steps_per_epoch"] == 7
    assert lines[6]["epoch"] == 1 and st["epoch"] == pytest.approx(TINY_RUN_STEPS / 7)
    assert st["samples_seen"] == 2 * TINY_RUN_STEPS
    assert st["checkpoint"]["tag"] == f"step_{TINY_RUN_STEPS:06d}"
    assert st["checkpoint"]["step"] == TINY_RUN_STEPS
    assert st["curriculum_stage"] == "easy_hard"
    assert st["curriculum_stage_index"] == 1 and st["num_curriculum_stages"] == 2
    assert st["curriculum_since_step"] == TINY_RUN_STAGE_STEP
    assert st["curriculum_mix"] == {"easy": 0.5, "hard": 0.5}
    waits = [ln["data/wait_fraction"] for ln in lines if "data/wait_fraction" in ln]
    assert st["data_wait_fraction"] == pytest.approx(sum(waits) / len(waits))
    assert st["skipped_total"] == 0
    assert st["loss"] == pytest.approx(lines[-1]["loss"])
    # The trainer writes each step's wall time: the rate is steps over time in the log's tail.
    first, last = lines[0], lines[-1]
    rate = (last["step"] - first["step"]) / (last["time"] - first["time"])
    assert st["steps_per_s"] == pytest.approx(rate)
    assert set(st["val_metrics"]) == {"val/sync_acc_easy", "val/sync_acc_hard"}
    assert st["mlflow_run_id"] == (run_dir / "mlflow_run_id").read_text().strip()
    # ... and the run's length: no guess from the config.
    assert lines[-1]["total_steps"] == TINY_RUN_STEPS
    assert not any("total steps from" in n for n in st["notes"]), st["notes"]

    assert main(["status", str(run_dir)]) == 0
    text = capsys.readouterr().out
    labels = [ln.split()[0] for ln in text.splitlines() if not ln.startswith("note:")]
    for label in ("run", "state", "step", "epoch", "rate", "ETA", "checkpoint", "curriculum"):
        assert label in labels, text
    assert "data" in labels and "skipped" in labels and "mlflow" in labels
    assert f"step        {TINY_RUN_STEPS} / {TINY_RUN_STEPS} (100%)" in text


def _synthetic_run(tmp_path: Path, total: int = 20) -> Path:
    run_dir = tmp_path / "live"
    cfg = load_config(
        None,
        [
            f"run.dir={run_dir}",
            "run.name=live",
            f"train.max_steps={total}",
            "data.global_batch_size=4",
            "data.url=/nonexistent/dataset",
            "curriculum.stages=[{name: easy, until_step: 10}, {name: hard, negative_mix: {hard: 1}}]",
            "tracking.enabled=false",
        ],
    )
    save_config(cfg, run_dir / "config.yaml")
    return run_dir


def _line(step: int, t0: float, **extra) -> str:
    rec = {"step": step, "epoch": 0, "loss": 1.0 / step, "lr": 1e-3, "samples_seen": 4 * step}
    rec["time"] = t0 + 0.5 * step  # two steps per second
    rec.update(extra)
    return json.dumps(rec) + "\n"


def _complete(run_dir: Path, step: int, t: float) -> None:
    tag = run_dir / "checkpoints" / f"step_{step:06d}"
    tag.mkdir(parents=True)
    (tag / "COMPLETE").write_text(json.dumps({"tag": tag.name, "step": step, "time": t}))


def test_status_follows_a_run_being_appended_to(tmp_path):
    run_dir = _synthetic_run(tmp_path)
    t0 = 1_000_000.0
    st = read_status(str(run_dir), read_dataset=False, now=t0)
    assert st.state == "starting" and st.step == 0 and st.checkpoint is None
    metrics = run_dir / "metrics.jsonl"
    with metrics.open("a") as f:
        for step in range(1, 6):
            f.write(_line(step, t0))
        f.write(_line(6, t0)[:25])  # the trainer is in the middle of writing step 6
    st = read_status(str(run_dir), read_dataset=False, now=t0 + 3)
    assert st.state == "running" and st.step == 5 and st.total_steps == 20
    assert st.steps_per_s == pytest.approx(2.0) and st.samples_per_s == pytest.approx(8.0)
    assert st.eta_s == pytest.approx(15 / 2.0)
    assert st.curriculum_stage == "easy" and st.curriculum_since_step == 0
    assert not any("rate from train/step_s" in n for n in st.notes)  # lines carry a time
    assert any("line(s) of metrics.jsonl are not JSON" in n for n in st.notes) is False

    _complete(run_dir, 10, t0 + 5)
    with metrics.open("a") as f:
        f.write(_line(6, t0)[25:])
        for step in range(7, 12):
            extra = {}
            if step == 10:
                extra = {"curriculum": [{"to_stage": "hard"}], "curriculum/stage_index": 1}
            if step == 11:
                extra = {
                    "data/wait_fraction": 0.25,
                    "data/skipped_total": 3,
                    "data/skipped/decode_error": 2,
                    "data/skipped/missing": 1,
                }
            f.write(_line(step, t0, **extra))
    st = read_status(str(run_dir), read_dataset=False, now=t0 + 6)
    assert st.step == 11 and st.eta_s == pytest.approx(9 / 2.0)
    assert st.checkpoint == {
        "tag": "step_000010",
        "step": 10,
        "url": f"{run_dir}/checkpoints/step_000010",
        "age_s": pytest.approx(1.0),
    }
    assert st.curriculum_stage == "hard" and st.curriculum_since_step == 10
    assert st.curriculum_mix == {"hard": 1.0}
    assert st.data_wait_fraction == pytest.approx(0.25)
    assert st.skipped_total == 3
    assert st.skipped_by_reason == {"decode_error": 2, "missing": 1}
    text = format_status(st)
    assert "skipped     3 clips replaced (decode_error 2, missing 1)" in text
    assert "hard (hard 1): stage 2 of 2, since step 10" in text

    # Long silence before the end: the run stopped (killed, preempted or failed).
    late = metrics.stat().st_mtime + 3600
    st = read_status(str(run_dir), read_dataset=False, now=late, stale_after_s=600)
    assert st.state == "stopped" and st.step == 11
    # A corrupt line in the middle is skipped with a note, not fatal.
    with metrics.open("a") as f:
        f.write("{not json\n")
        for step in range(12, 21):
            f.write(_line(step, t0))
    st = read_status(str(run_dir), read_dataset=False, now=t0 + 12)
    assert st.state == "running"  # at the last step but its checkpoint is not complete yet
    _complete(run_dir, 20, t0 + 11)
    st = read_status(str(run_dir), read_dataset=False, now=t0 + 12)
    assert st.state == "finished" and st.step == st.total_steps == 20 and st.eta_s == 0.0
    assert any("1 line(s) of metrics.jsonl are not JSON" in n for n in st.notes)


def test_status_reads_while_a_writer_appends(tmp_path):
    """A writer thread appends lines in small pieces; every status read in between is whole."""
    run_dir = _synthetic_run(tmp_path, total=400)
    metrics = run_dir / "metrics.jsonl"
    done = threading.Event()

    def write():
        with metrics.open("a") as f:
            for step in range(1, 401):
                line = _line(step, 0.0, **{"data/wait_fraction": 0.5, "data/skipped_total": 0})
                for i in range(0, len(line), 17):  # torn writes, flushed piece by piece
                    f.write(line[i : i + 17])
                    f.flush()
                if step % 50 == 0:
                    time.sleep(0.01)
        done.set()

    writer = threading.Thread(target=write)
    writer.start()
    steps = []
    while not done.is_set() or not steps or steps[-1] < 400:
        st = read_status(str(run_dir), read_dataset=False, ask_mlflow=False)
        assert not [n for n in st.notes if "not JSON" in n], st.notes
        steps.append(st.step)
        if done.is_set() and steps[-1] == 400:
            break
    writer.join()
    assert steps == sorted(steps) and steps[-1] == 400


def test_status_of_a_run_in_s3(tiny_run, s3_server, s3_bucket, capsys, monkeypatch):
    """The real run's files copied to S3 (as a remote run dir would be): the same figures, with
    the endpoint given only by --storage-options (it reaches the checkpoints too)."""
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}, skip_instance_cache=True)
    run_dir = tiny_run["run_dir"]
    remote = f"{s3_bucket}/runs/tiny"
    for name in ("config.yaml", "metrics.jsonl", "mlflow_run_id"):
        fs.put_file(str(run_dir / name), f"{remote}/{name}")
    for tag in (run_dir / "checkpoints").glob("step_*"):
        fs.put_file(str(tag / "COMPLETE"), f"{remote}/checkpoints/{tag.name}/COMPLETE")
    opts = json.dumps({"client_kwargs": {"endpoint_url": s3_server}})
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert main(["status", f"s3://{remote}", "--json", "--storage-options", opts]) == 0
    remote_st = json.loads(capsys.readouterr().out)
    local_st = read_status(str(run_dir)).to_dict()
    for key in ("step", "total_steps", "curriculum_stage", "data_wait_fraction", "loss"):
        assert remote_st[key] == local_st[key], key
    assert remote_st["checkpoint"]["tag"] == local_st["checkpoint"]["tag"]
    assert remote_st["checkpoint"]["url"] == f"s3://{remote}/checkpoints/step_{TINY_RUN_STEPS:06d}"
    assert remote_st["state"] == "finished"


def test_status_errors(tmp_path, capsys):
    assert main(["status", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is not a run directory" in err
