"""The checkpoint component without DeepSpeed: finding, resolving, verifying (sizes, then
sha256), fetching, the walk-back to a checkpoint that verifies with quarantine, keep-last and the
publish check, on hand-made checkpoint folders (local disk, fsspec's memory filesystem, a real S3
endpoint)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import fsspec
import pytest

from avts_dist.config import CheckpointConfig
from avts_dist.storage import get_fs
from avts_dist.train.checkpoint import (
    COMPLETE,
    QUARANTINED,
    CheckpointDamaged,
    CheckpointError,
    CheckpointManager,
    fetch_checkpoint,
    list_checkpoints,
    list_quarantined,
    resolve_checkpoint,
    tag_for,
    validate,
)


def manifest_entry(data: bytes) -> dict:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def make_tag(root: Path, step: int, *, complete: bool = True, world_size: int = 1) -> Path:
    tag_dir = root / tag_for(step)
    tag_dir.mkdir(parents=True)
    files = {"mp_rank_00_model_states.pt": b"m" * (10 + step), "rng_rank_00000.pt": b"r" * 3}
    for name, data in files.items():
        (tag_dir / name).write_bytes(data)
    if complete:
        meta = {
            "format_version": 1, "tag": tag_dir.name, "step": step, "world_size": world_size,
            "zero_stage": 1, "files": {n: manifest_entry(d) for n, d in files.items()},
        }  # fmt: skip
        (tag_dir / COMPLETE).write_text(json.dumps(meta))
    return tag_dir


@pytest.fixture
def run_dir(tmp_path) -> Path:
    ckpts = tmp_path / "run" / "checkpoints"
    for step in (2, 10, 4):
        make_tag(ckpts, step)
    make_tag(ckpts, 12, complete=False)  # a save killed before COMPLETE
    (ckpts / ".tmp-step_000014").mkdir()
    return tmp_path / "run"


def test_list_is_oldest_first_and_skips_incomplete(run_dir):
    found = list_checkpoints(str(run_dir / "checkpoints"))
    assert [r.tag for r in found] == ["step_000002", "step_000004", "step_000010"]
    assert [r.step for r in found] == [2, 4, 10]
    assert list_checkpoints(str(run_dir / "nothing")) == []


@pytest.mark.parametrize(
    ("suffix", "tag"),
    [
        ("", "step_000010"),  # a run dir: its checkpoints/
        ("/checkpoints", "step_000010"),  # a checkpoints dir: its newest complete tag
        ("/checkpoints/step_000004", "step_000004"),  # a tag dir
        ("/checkpoints/step_000004/", "step_000004"),
    ],
)
def test_resolve_any_path_form(run_dir, suffix, tag):
    ref = resolve_checkpoint(f"{run_dir}{suffix}")
    assert ref.tag == tag and ref.step == int(tag[-6:])
    assert ref.root == str(run_dir / "checkpoints") and not ref.remote
    assert resolve_checkpoint(f"file://{run_dir}{suffix}").tag == tag


def test_resolve_errors_say_what_is_missing(run_dir, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        resolve_checkpoint(str(tmp_path / "absent"))
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_checkpoint(str(run_dir / "checkpoints" / "step_000012"))


def test_validate_catches_missing_and_truncated_files(run_dir):
    tag_dir = run_dir / "checkpoints" / "step_000010"
    assert validate(tag_dir)["step"] == 10
    (tag_dir / "rng_rank_00000.pt").write_bytes(b"r")  # truncated
    with pytest.raises(CheckpointError, match="rng_rank_00000.pt has 1 bytes, the manifest says 3"):
        validate(tag_dir)
    (tag_dir / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt is missing"):
        validate(tag_dir)
    other = run_dir / "checkpoints" / "step_000004"
    meta = json.loads((other / COMPLETE).read_text())
    with pytest.raises(CheckpointError, match="format_version"):
        validate(other, {**meta, "format_version": 99})
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        validate(run_dir / "checkpoints" / "step_000012")


def test_remote_resolve_and_fetch(run_dir, tmp_path):
    """memory:// is a remote filesystem to the component: resolved there, fetched to local."""
    fs = fsspec.filesystem("memory")
    fs.put(str(run_dir / "checkpoints"), "/ck", recursive=True)
    ref = resolve_checkpoint("memory://ck")
    assert ref.remote and ref.tag == "step_000010" and ref.url == "memory://ck/step_000010"
    local = fetch_checkpoint(ref, tmp_path / "stage")
    assert validate(local / ref.tag)["step"] == 10
    # A valid local copy is reused; a damaged one is replaced by a fresh download.
    (local / ref.tag / "rng_rank_00000.pt").write_bytes(b"broken!")
    assert validate(fetch_checkpoint(ref, tmp_path / "stage") / ref.tag)["step"] == 10
    fs.pipe("/ck/step_000010/rng_rank_00000.pt", b"x")  # the remote copy itself is damaged
    (local / ref.tag / "rng_rank_00000.pt").unlink()
    with pytest.raises(CheckpointError, match="damaged"):
        fetch_checkpoint(ref, tmp_path / "stage")
    fs.rm("/ck", recursive=True)


def test_plan_resume_single_process(run_dir, tmp_path):
    cfg = CheckpointConfig(dir=str(run_dir / "checkpoints"))
    manager = CheckpointManager(cfg, run_dir=run_dir, rank=0, world_size=1)
    assert manager.fs_leader
    assert manager.plan_resume("none") is None
    plan = manager.plan_resume("auto")
    assert plan.source.tag == plan.load_tag == "step_000010"
    assert plan.same_world_size and not plan.universal
    assert plan.rng_file(0) == run_dir / "checkpoints" / "step_000010" / "rng_rank_00000.pt"
    plan = manager.plan_resume(str(run_dir / "checkpoints" / "step_000004"))
    assert plan.source.step == 4
    empty = CheckpointManager(CheckpointConfig(dir=str(tmp_path / "e")), run_dir=tmp_path,
                              rank=0, world_size=1)  # fmt: skip
    assert empty.plan_resume("auto") is None  # a fresh start
    with pytest.raises(CheckpointError, match="resume=.*not found"):
        empty.plan_resume(str(tmp_path / "typo"))


def test_publish_refuses_a_file_not_confirmed(run_dir):
    """COMPLETE is written only when every rank's reported file is there with its size."""
    cfg = CheckpointConfig(dir=str(run_dir / "checkpoints"))
    manager = CheckpointManager(cfg, run_dir=run_dir, rank=0, world_size=2)
    tag_dir = run_dir / "checkpoints" / "step_000010"
    files = json.loads((tag_dir / COMPLETE).read_text())["files"]
    assert manager._confirm(tag_dir, "step_000010", files) is None
    # Rank 1 reported a shard this filesystem does not have (another node's disk).
    problem = manager._confirm(tag_dir, "step_000010", {**files, "zero_pp_rank_1.pt": 5})
    assert "zero_pp_rank_1.pt (None of 5 bytes)" in problem
    problem = manager._confirm(tag_dir, "step_000010", {**files, "rng_rank_00000.pt": 4})
    assert "rng_rank_00000.pt (3 of 4 bytes)" in problem


# ---------------------------------------------------------------------------------------------
# Checksums, walk-back, quarantine, keep-last


def _manager(ckpt_dir: str, run_dir: Path, **cfg) -> CheckpointManager:
    return CheckpointManager(
        CheckpointConfig(dir=ckpt_dir, **cfg), run_dir=run_dir, rank=0, world_size=1
    )


def test_validate_catches_a_same_size_change_by_its_sha256(run_dir):
    """A silent change a size check misses: same size, other bytes."""
    tag_dir = run_dir / "checkpoints" / "step_000010"
    path = tag_dir / "mp_rank_00_model_states.pt"
    path.write_bytes(b"M" + path.read_bytes()[1:])
    with pytest.raises(
        CheckpointDamaged, match="mp_rank_00_model_states.pt: its sha256 differs"
    ) as e:
        validate(tag_dir)
    assert e.value.reason == "sha256-mismatch"
    # A manifest written before checksums ({name: size}) is still read, by size only.
    meta = json.loads((tag_dir / COMPLETE).read_text())
    meta["files"] = {n: entry["size"] for n, entry in meta["files"].items()}
    assert validate(tag_dir, meta)["step"] == 10


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda p: p.write_bytes(b""), "size-mismatch"),  # an empty rng_rank_*.pt
        (lambda p: p.write_bytes(p.read_bytes()[:-1]), "size-mismatch"),  # truncated
        (lambda p: p.unlink(), "missing-file"),
        (lambda p: p.write_bytes(b"x" * p.stat().st_size), "sha256-mismatch"),
    ],
)
def test_walk_back_quarantines_what_does_not_verify(run_dir, caplog, damage, reason):
    ckpts = run_dir / "checkpoints"
    damage(ckpts / "step_000010" / "rng_rank_00000.pt")
    manager = _manager(str(ckpts), run_dir)
    with caplog.at_level(logging.WARNING, logger="avts.train"):
        plan = manager.plan_resume("auto")
    assert plan.source.tag == "step_000004"
    # Both newer tags were skipped (step_000012: an unfinished save), kept under new names.
    assert (ckpts / f"step_000010.quarantined-{reason}" / "mp_rank_00_model_states.pt").is_file()
    assert (ckpts / "step_000012.quarantined-no-manifest").is_dir()
    note = json.loads((ckpts / f"step_000010.quarantined-{reason}" / QUARANTINED).read_text())
    assert note["reason"] == reason and "rng_rank_00000.pt" in note["detail"]
    assert (ckpts / "latest").read_text() == "step_000004"
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resume=auto")]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "step_000010 (rng_rank_00000.pt" in lines[0] and "resuming from step_000004" in lines[0]
    assert "step_000012 (no readable COMPLETE" in lines[0]
    # The next resume finds the same good checkpoint: nothing was deleted on the way.
    assert _manager(str(ckpts), run_dir).plan_resume("auto").source.tag == "step_000004"
    assert [r.tag for r in list_checkpoints(str(ckpts))] == ["step_000002", "step_000004"]
    assert len(list_quarantined(str(ckpts))) == 2


def test_nothing_verifies_is_an_error_then_and_later(run_dir):
    ckpts = run_dir / "checkpoints"
    for step in (2, 4, 10):
        (ckpts / tag_for(step) / "rng_rank_00000.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no checkpoint in .* verifies .*resume=none"):
        _manager(str(ckpts), run_dir).plan_resume("auto")
    assert len(list_quarantined(str(ckpts))) == 4  # 2, 4, 10 and the unfinished 12
    # Not a silent fresh start the second time either.
    with pytest.raises(CheckpointError, match="holds only quarantined ones"):
        _manager(str(ckpts), run_dir).plan_resume("auto")


def test_explicit_resume_path_is_verified_and_left_in_place(run_dir):
    tag_dir = run_dir / "checkpoints" / "step_000004"
    (tag_dir / "rng_rank_00000.pt").write_bytes(b"rr!")
    with pytest.raises(
        CheckpointError, match=r"resume=.*step_000004.*rng_rank_00000.pt: its sha256"
    ):
        _manager(str(run_dir / "checkpoints"), run_dir).plan_resume(str(tag_dir))
    assert tag_dir.is_dir()  # the user named it: reported, not renamed


@pytest.mark.parametrize("store", ["memory", "s3"])
def test_walk_back_on_a_remote_dir(run_dir, tmp_path, store, request):
    """The same walk-back where the checkpoints are remote: downloaded, verified, and the damaged
    one quarantined by a rename on the store."""
    if store == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        url = f"s3://{bucket}/ck"
    else:
        url = "memory://walkback/ck"
    fs, root = get_fs(url)
    fs.put(str(run_dir / "checkpoints") + "/", root, recursive=True)
    fs.pipe_file(f"{root}/step_000010/mp_rank_00_model_states.pt", b"M" * 20)  # same size
    manager = _manager(url, run_dir, staging_dir=str(tmp_path / "stage"))
    plan = manager.plan_resume("auto")
    assert plan.source.tag == "step_000004" and plan.local_root == tmp_path / "stage"
    assert list_quarantined(url) == [
        "step_000010.quarantined-sha256-mismatch", "step_000012.quarantined-no-manifest",
    ]  # fmt: skip
    assert fs.cat_file(f"{root}/latest") == b"step_000004"
    fs.invalidate_cache()
    assert fs.cat_file(f"{root}/step_000010.quarantined-sha256-mismatch/mp_rank_00_model_states.pt")
    if store == "memory":
        fs.rm("/walkback", recursive=True)


def test_keep_last_counts_only_checkpoints_that_verify(run_dir):
    ckpts = run_dir / "checkpoints"
    (ckpts / "step_000004" / "rng_rank_00000.pt").write_bytes(b"")  # damaged since its save
    manager = _manager(str(ckpts), run_dir, keep_last=2)
    manager.retention.retain("step_000010", rank=0, fs_leader=True)
    # Kept: 10 (just published) and 2, the next that verifies; 4 quarantined, not deleted.
    assert [r.tag for r in list_checkpoints(str(ckpts))] == ["step_000002", "step_000010"]
    assert list_quarantined(str(ckpts)) == ["step_000004.quarantined-size-mismatch"]
    make_tag(ckpts, 14)
    manager.retention.retain("step_000014", rank=0, fs_leader=True)
    assert [r.tag for r in list_checkpoints(str(ckpts))] == ["step_000010", "step_000014"]
    # The tag just published is never the one deleted, even when higher steps are left over
    # from a run that was resumed further back.
    make_tag(ckpts, 6)
    _manager(str(ckpts), run_dir, keep_last=1).retention.retain(
        "step_000006", rank=0, fs_leader=True
    )
    assert [r.tag for r in list_checkpoints(str(ckpts))] == ["step_000006"]


def test_unreachable_checkpoint_endpoint_is_one_clear_line(tmp_path, monkeypatch):
    from avts_dist.distributed import free_port

    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    with pytest.raises(CheckpointError) as e:
        _manager("s3://bucket/ck", tmp_path)
    text = str(e.value)
    assert "\n" not in text and "checkpoint.dir=s3://bucket/ck" in text
    assert f"storage endpoint {endpoint} is unreachable" in text
    assert "does not exist" not in text
    with pytest.raises(CheckpointError, match="unreachable"):
        resolve_checkpoint("s3://bucket/ck")


def test_read_back_after_resume_compares_what_the_disk_holds(run_dir, tmp_path):
    """The first save after a resume reads its files back (past the page cache) against the
    size and sha256 taken while writing them: a byte changed on its way to the disk shows."""
    from avts_dist.integrity import file_record, save_torch

    manager = _manager(str(run_dir / "checkpoints"), run_dir)
    tag_dir = tmp_path / ".tmp-step_000020"
    tag_dir.mkdir()
    records = {
        "rng_rank_00000.pt": save_torch({"x": list(range(100))}, tag_dir / "rng_rank_00000.pt")
    }
    assert records["rng_rank_00000.pt"] == file_record(tag_dir / "rng_rank_00000.pt")
    assert manager._read_back(tag_dir, "step_000020", records) is None
    data = bytearray((tag_dir / "rng_rank_00000.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tag_dir / "rng_rank_00000.pt").write_bytes(bytes(data))
    problem = manager._read_back(tag_dir, "step_000020", records)
    assert problem == f"read back from {tag_dir}, rng_rank_00000.pt differs from what was written"


@pytest.mark.parametrize("where", ["local", "memory"])
def test_keep_last_is_the_same_on_either_storage(run_dir, tmp_path, where):
    """The storage protocol: keep-last deletes and quarantines the same tags on a local dir and
    on a remote one (there, staged copies beyond keep-last go too)."""
    ckpts = run_dir / "checkpoints"
    (ckpts / "step_000004" / "rng_rank_00000.pt").write_bytes(b"")  # damaged since its save
    url = str(ckpts)
    if where == "memory":
        url = "memory://keeplast/ck"
        fs, root = get_fs(url)
        fs.put(str(ckpts) + "/", root, recursive=True)
        stage = tmp_path / "stage"
        for step in (2, 10):  # staged copies of the saves this process made
            make_tag(stage, step)
    manager = _manager(url, run_dir, keep_last=1, staging_dir=str(tmp_path / "stage"))
    manager.retention.retain("step_000010", rank=0, fs_leader=True)
    assert [r.tag for r in list_checkpoints(url)] == ["step_000010"]
    assert list_quarantined(url) == []  # 4 was deleted unread: beyond keep-last
    if where == "memory":
        assert [r.tag for r in list_checkpoints(str(tmp_path / "stage"))] == ["step_000010"]
        fs.rm("/keeplast", recursive=True)


def test_states_go_under_fixed_keys_and_come_back(tmp_path):
    """The client state composes each Stateful under its key (trainer, curriculum, loader,
    rng), versioned; restoring puts each back, and the RNG only at the same world size."""
    import torch

    from avts_dist.train.checkpoint import STATE_KEYS, RNGState
    from avts_dist.train.checkpoint.states import compose_client_state, restore_states
    from avts_dist.train.trainer_state import TrainerState

    class Box:
        def __init__(self, value):
            self.value = value

        def state_dict(self):
            return {"value": self.value}

        def load_state_dict(self, state):
            self.value = state["value"]

    trainer = TrainerState(global_batch_size=8, step=5, num_skipped_steps=1)
    states = {"trainer": trainer, "curriculum": Box("easy"), "loader": Box(3), "rng": RNGState()}
    torch.manual_seed(7)
    client = compose_client_state(states, world_size=2, extra={"mlflow_run_id": "abc"})
    assert tuple(k for k in client if k in STATE_KEYS) == STATE_KEYS
    assert client["format_version"] == 1 and client["world_size"] == 2
    assert client["trainer"]["samples_seen"] == 40 and client["mlflow_run_id"] == "abc"
    rng_file = tmp_path / "rng_rank_00000.pt"
    torch.save(client["rng"], rng_file)
    expected = torch.rand(3)
    fresh = {
        "trainer": TrainerState(global_batch_size=8), "curriculum": Box(None),
        "loader": Box(None), "rng": RNGState(),
    }  # fmt: skip
    assert restore_states(fresh, client, world_size=2, rng_file=rng_file)
    assert fresh["trainer"] == trainer and fresh["loader"].value == 3
    assert torch.equal(torch.rand(3), expected)  # the generators continue where they were
    assert not restore_states(fresh, client, world_size=1, rng_file=rng_file)
    with pytest.raises(CheckpointError, match="format_version 0; this code reads 1"):
        restore_states(fresh, {**client, "format_version": 0}, world_size=2)
    with pytest.raises(ValueError, match="checkpoint states must be"):
        compose_client_state({"trainer": trainer}, world_size=1, extra={})


def test_status_and_checkpoint_import_no_training_stack():
    """`avts status`, `export` and `eval` find checkpoints without loading the trainer or
    DeepSpeed: avts_dist.train is lazy and the checkpoint references are light."""
    import subprocess
    import sys

    code = "import avts_dist.status, avts_dist.train.checkpoint, sys; print('deepspeed' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"
    code = "import avts_dist.status, avts_dist.train, sys; print('avts_dist.train.trainer' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr[-2000:]
