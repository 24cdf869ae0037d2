"""Damaged checkpoints, non-finite stops and a full disk, on real checkpoints of a real run.

Every test copies the shared tiny run (``tests/fixtures/tiny_run.py``: one process, checkpoints
at steps 4 and 8) and damages its copy the way issue #12 item 1 found them: random bytes in the
newest optimizer file, weights scaled by 1.5 (same size), a truncated or missing file, an empty
``rng_rank_*.pt``. The full disk is a real tmpfs of a few MiB, mounted for the test.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from avts_dist.cli import main
from avts_dist.config import CheckpointConfig
from avts_dist.train.checkpoint import (
    COMPLETE,
    CheckpointManager,
    list_checkpoints,
    list_quarantined,
    validate,
)
from tests.fixtures import train_hooks
from tests.fixtures.in_process import avts
from tests.fixtures.tiny_run import TINY_RUN_STEPS

pytestmark = pytest.mark.slow

OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
MODEL = "mp_rank_00_model_states.pt"
RNG = "rng_rank_00000.pt"


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    """A private copy of the tiny run's folder (checkpoints at steps 4 and 8)."""
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run["run_dir"], run_dir, ignore=shutil.ignore_patterns("checkpoint_st*"))
    return run_dir


def avts_train(tiny_run, run_dir: Path, *overrides: str, hooks: tuple[str, ...] = ()):
    """`avts train` on the tiny run's config in ``run_dir`` (or, with ``hooks``, its test-side
    stand-in from tests/fixtures/train_hooks.py), without tracking, in-process (one rank)."""
    config = ["--config", str(tiny_run["config"])]
    argv = [*hooks, *config] if hooks else ["train", *config]
    argv += [f"run.dir={run_dir}", "tracking.enabled=false", *overrides]
    return avts(argv, cwd=run_dir.parent, entry=train_hooks.main if hooks else None)


def losses(run_dir: Path) -> dict[int, float | None]:
    lines = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {ln["step"]: ln["loss"] for ln in lines}


def error_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ": error: " in ln]


def only_line(proc: subprocess.CompletedProcess, returncode: int, marker: str) -> str:
    """The one stderr line holding ``marker``, of a run that exited with ``returncode``."""
    assert proc.returncode == returncode, proc.stderr[-4000:]
    lines = [ln for ln in proc.stderr.splitlines() if marker in ln]
    assert len(lines) == 1, proc.stderr[-4000:]
    return lines[0]


def scale_weights(path: Path, factor: float, count: int = 256) -> None:
    """Multiplies ``count`` values of the first float weight by ``factor`` where they lie in the
    file (torch's zip format stores tensors uncompressed): same size, other content, and the
    file still loads."""
    state = torch.load(path, weights_only=False)
    weights = next(
        t for t in state["module"].values() if t.is_floating_point() and t.numel() >= count
    )
    old = weights.reshape(-1)[:count].contiguous()
    data = path.read_bytes()
    at = data.index(old.numpy().tobytes())
    path.write_bytes(
        data[:at] + (old * factor).numpy().tobytes() + data[at + old.numel() * old.element_size() :]
    )


def random_bytes_into(path: Path, num_bytes: int = 4096) -> None:
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        f.write(os.urandom(num_bytes))


def walk_back(run_dir: Path):
    manager = CheckpointManager(
        CheckpointConfig(dir=str(run_dir / "checkpoints")), run_dir=run_dir, rank=0, world_size=1
    )
    return manager.plan_resume("auto")


# ---------------------------------------------------------------------------------------------


def test_corrupt_newest_checkpoint_twice_keeps_the_good_one(tiny_run, run_copy):
    """Random bytes in the newest optimizer file: resume=auto walks back to step 4 in one line,
    keeps step 8 quarantined, trains on with the same losses as the undisturbed run. A second
    resume=auto, after the new step 8's weights were scaled by 1.5 (same size), does the same
    again: step 4, the last good checkpoint, is never deleted."""
    ckpts = run_copy / "checkpoints"
    reference = losses(tiny_run["run_dir"])
    random_bytes_into(ckpts / "step_000008" / OPTIM)

    skipped = only_line(avts_train(tiny_run, run_copy, "resume=auto"), 0, "resume=auto: skipped")
    assert re.search(
        rf"skipped step_000008 \({OPTIM}: its sha256 differs.*\) -> kept as "
        r"step_000008\.quarantined-sha256-mismatch; resuming from step_000004",
        skipped,
    ), skipped
    assert (ckpts / "step_000008.quarantined-sha256-mismatch" / OPTIM).is_file()
    resumed = losses(run_copy)
    for step in range(5, TINY_RUN_STEPS + 1):  # single process: deterministic, bitwise
        assert resumed[step] == reference[step], (step, resumed[step], reference[step])
    assert (ckpts / "latest").read_text() == "step_000008"
    validate(ckpts / "step_000008")  # the new step 8 verifies

    new_model = ckpts / "step_000008" / MODEL
    size = new_model.stat().st_size
    scale_weights(new_model, 1.5)
    assert new_model.stat().st_size == size  # a change only a checksum sees

    skipped = only_line(avts_train(tiny_run, run_copy, "resume=auto"), 0, "resume=auto: skipped")
    assert f"step_000008 ({MODEL}: its sha256 differs" in skipped
    assert "kept as step_000008.quarantined-sha256-mismatch.2" in skipped
    assert [r.tag for r in list_checkpoints(str(ckpts))] == ["step_000004", "step_000008"]
    assert list_quarantined(str(ckpts)) == [
        "step_000008.quarantined-sha256-mismatch",
        "step_000008.quarantined-sha256-mismatch.2",
    ]
    for tag in ("step_000004", "step_000008"):
        validate(ckpts / tag)
    assert losses(run_copy)[TINY_RUN_STEPS] == reference[TINY_RUN_STEPS]


DAMAGES = {
    "random-bytes": (OPTIM, random_bytes_into, "sha256-mismatch", "its sha256 differs"),
    "scaled-weights": (MODEL, lambda p: scale_weights(p, 1.5), "sha256-mismatch", "sha256"),
    "truncated": (
        OPTIM, lambda p: os.truncate(p, p.stat().st_size - 100), "size-mismatch", "bytes, the"
    ),
    "missing": (OPTIM, lambda p: p.unlink(), "missing-file", "is missing"),
    "empty-rng": (RNG, lambda p: p.write_bytes(b""), "size-mismatch", "has 0 bytes"),
}  # fmt: skip


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damage_is_skipped_by_resume_and_named_by_export_and_eval(
    damage, run_copy, tmp_path, capsys, caplog
):
    """Each damage: resume=auto picks step 4 and quarantines step 8; `avts export` and `avts eval
    sync` on the damaged tag exit 2 with one line naming the file; nothing is renamed by them."""
    name, apply, reason, words = DAMAGES[damage]
    ckpts = run_copy / "checkpoints"
    damaged = ckpts / "step_000008"
    apply(damaged / name)

    assert main(["export", "--checkpoint", str(damaged), "--out", str(tmp_path / "m.pt")]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and name in lines[0] and words in lines[0], lines
    assert not (tmp_path / "m.pt").exists()

    with contextlib.redirect_stdout(io.StringIO()):
        rc = main(["eval", "sync", "--checkpoint", str(ckpts), "eval.progress=false"])
    assert rc == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and name in lines[0] and "step_000008" in lines[0], lines
    assert damaged.is_dir()  # a checkpoint named by the user is reported, not moved

    plan = walk_back(run_copy)
    assert plan.source.tag == "step_000004"
    assert list_quarantined(str(ckpts)) == [f"step_000008.quarantined-{reason}"]
    assert (ckpts / "latest").read_text() == "step_000004"


def test_resume_path_to_a_damaged_checkpoint_exits_2(tiny_run, run_copy):
    tag_dir = run_copy / "checkpoints" / "step_000008"
    (tag_dir / RNG).write_bytes(b"")
    proc = avts_train(tiny_run, run_copy, f"resume={tag_dir}")
    assert f"{RNG} has 0 bytes, the manifest says" in only_line(proc, 2, ": error: ")
    assert "Traceback" not in proc.stderr
    assert tag_dir.is_dir()


def test_nonfinite_stop_never_publishes(tiny_run, run_copy):
    """Three non-finite steps in a row stop the run with the last good checkpoint as `latest`
    (the state is kept as a quarantined tag). A resume whose very first steps are non-finite
    saves nothing and says that the checkpoint itself verified."""
    ckpts = run_copy / "checkpoints"
    longer = ("train.max_steps=14", "train.max_nonfinite_steps=3", "checkpoint.every_steps=4")
    stopped = avts_train(tiny_run, run_copy, "resume=auto", *longer, hooks=("--nan-at", "10,11,12"))
    assert stopped.returncode == 1, stopped.stderr[-4000:]
    assert "latest stays step_000008, the last good checkpoint" in stopped.stderr
    assert "kept for debugging as step_000012.quarantined-nonfinite" in stopped.stderr
    assert (ckpts / "latest").read_text() == "step_000008"
    assert [r.tag for r in list_checkpoints(str(ckpts))] == ["step_000004", "step_000008"]
    assert (ckpts / "step_000012.quarantined-nonfinite" / COMPLETE).is_file()

    again = avts_train(tiny_run, run_copy, "resume=auto", *longer, hooks=("--nan-at", "9,10,11"))
    assert again.returncode == 1, again.stderr[-4000:]
    assert "after resuming from step_000008 had a non-finite loss" in again.stderr
    assert "its files match their checksums" in again.stderr
    assert "latest stays step_000008; resume=" in again.stderr
    assert (ckpts / "latest").read_text() == "step_000008"
    assert list_quarantined(str(ckpts)) == ["step_000012.quarantined-nonfinite"]
    assert [r.tag for r in list_checkpoints(str(ckpts))] == ["step_000004", "step_000008"]


def test_full_disk_is_one_clear_line_and_keeps_latest(tiny_run, run_copy, small_tmpfs):
    """A real small tmpfs as checkpoint.dir. The disk fills up during the save of step 8 (after
    its space check): the write's ENOSPC is one line naming the path, free space and size needed;
    step 4 stays latest, nothing half-written is left. The next run is refused before writing."""
    size = sum(p.stat().st_size for p in (run_copy / "checkpoints" / "step_000004").iterdir())
    disk = small_tmpfs(4 * size + (1 << 20))
    ckpt_dir = disk / "ck"
    overrides = (f"checkpoint.dir={ckpt_dir}", "run.name=full")
    fresh = run_copy.parent / "fresh"
    proc = avts_train(
        tiny_run, fresh, *overrides, hooks=("--fill-disk-at", f"after_space_check:8:{disk}")
    )
    line = only_line(proc, 2, ": error: ")
    assert re.search(
        rf"checkpoint step_000008 not saved: no space left on device writing {ckpt_dir}/\S+: "
        r"[\d.]+ \w*B free there, about [\d.]+ \w*B needed .*; latest stays step_000004",
        line,
    ), line
    assert "inline_container" not in proc.stderr and "Traceback" not in proc.stderr
    assert (ckpt_dir / "latest").read_text() == "step_000004"
    assert sorted(p.name for p in ckpt_dir.iterdir() if p.name.startswith(("step", "."))) == [
        "step_000004"
    ]
    validate(ckpt_dir / "step_000004")

    # The disk is still full: the next save is refused before anything is written.
    line = only_line(avts_train(tiny_run, fresh, *overrides, "resume=auto"), 2, ": error: ")
    assert re.search(
        rf"not enough space for checkpoint step_000008 in {ckpt_dir}: [\d.]+ \w*B free, about "
        r"[\d.]+ \w*B needed \(the size of the previous checkpoint\); nothing written, "
        r"latest stays step_000004",
        line,
    ), line
    assert (ckpt_dir / "latest").read_text() == "step_000004"
