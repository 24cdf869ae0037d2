"""The checkpoint component without DeepSpeed: finding, resolving, validating, fetching and the
publish check, on hand-made checkpoint folders (local disk and fsspec's memory filesystem)."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pytest

from avts_dist.config import CheckpointConfig
from avts_dist.train.checkpoint import (
    COMPLETE,
    CheckpointError,
    CheckpointManager,
    fetch_checkpoint,
    list_checkpoints,
    resolve_checkpoint,
    tag_for,
    validate,
)


def make_tag(root: Path, step: int, *, complete: bool = True, world_size: int = 1) -> Path:
    tag_dir = root / tag_for(step)
    tag_dir.mkdir(parents=True)
    files = {"mp_rank_00_model_states.pt": b"m" * (10 + step), "rng_rank_00000.pt": b"r" * 3}
    for name, data in files.items():
        (tag_dir / name).write_bytes(data)
    if complete:
        meta = {
            "format_version": 1, "tag": tag_dir.name, "step": step, "world_size": world_size,
            "zero_stage": 1, "files": {n: len(d) for n, d in files.items()},
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
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt missing"):
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
