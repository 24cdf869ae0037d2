"""The decoder check with FFmpeg's shared libraries really missing (issue 19 item 3).

Each run is a real ``avts train`` in a private mount namespace (``unshare -m``, root) where
/dev/null is bind-mounted over the libavcodec, libavformat and libavutil files the system's
loader would give torchcodec: its import fails as on a machine without FFmpeg. PyAV and decord
load their own copies from their wheels, as they do there.

- ``data.video_decoder: auto`` (the default) trains on PyAV and says so in one line;
- ``data.video_decoder=torchcodec`` stops in one line, naming what failed and the fix.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from avts_dist.config import REPO_ROOT

HIDDEN = ("libavcodec.so", "libavformat.so", "libavutil.so")
# Mounts /dev/null over each file named before "--", then runs the command after it.
HIDE_SCRIPT = (
    'while [ "$1" != -- ]; do mount --bind /dev/null "$1" || exit 97; shift; done; shift; exec "$@"'
)


def _ffmpeg_files() -> list[str]:
    """The real files (links resolved) of FFmpeg's libraries that the system's loader finds
    (its cache, ``ldconfig -p``: where dlopen looks)."""
    cache = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
    found = set()
    for line in cache.splitlines():
        name, _, path = line.strip().partition(" => ")
        if name.startswith(HIDDEN) and path:
            found.add(os.path.realpath(path))
    return sorted(found)


def _hidden(argv: list[str]) -> list[str]:
    return ["unshare", "-m", "sh", "-c", HIDE_SCRIPT, "sh", *_ffmpeg_files(), "--", *argv]


@pytest.fixture(scope="module")
def no_ffmpeg():
    """Runs a command with FFmpeg's libraries hidden; skips where namespaces are not allowed."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("hiding FFmpeg's libraries needs unshare -m as root")
    probe = subprocess.run(_hidden(["true"]), capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"unshare -m with bind mounts is not allowed here: {probe.stderr.strip()}")

    def run(argv: list[str], cwd) -> subprocess.CompletedProcess:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
        return subprocess.run(
            _hidden(argv), cwd=cwd, env=env, capture_output=True, text=True, timeout=600
        )

    return run


def _train(tmp_path, corpus: str, *overrides: str) -> list[str]:
    config = tmp_path / "tiny.yaml"
    config.write_text(
        f"base: {REPO_ROOT / 'configs' / 'pretrain' / 'quickstart.yaml'}\n"
        f"run: {{name: nodec, dir: {tmp_path / 'run'}}}\n"
        f"data: {{url: {corpus}, global_batch_size: 2, num_workers: 1}}\n"
        "train: {max_steps: 2, log_every: 1, val_every_steps: 0, progress: false}\n"
        "checkpoint: {every_steps: 0}\n"
        "tracking: {enabled: false}\n"
    )
    return [sys.executable, "-m", "avts_dist", "train", "--config", str(config), *overrides]


def test_ffmpeg_is_really_hidden(no_ffmpeg, tmp_path):
    probe = (
        "import av, decord\ntry:\n import torchcodec.decoders\nexcept RuntimeError:\n print('no')"
    )
    proc = no_ffmpeg([sys.executable, "-c", probe], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "no"  # torchcodec cannot load; PyAV and decord do


def test_auto_trains_on_pyav_and_says_so(no_ffmpeg, tmp_path, synth_corpus):
    proc = no_ffmpeg(_train(tmp_path, synth_corpus), tmp_path)
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert "avts train: completed at step 2" in proc.stdout
    chosen = [line for line in proc.stderr.splitlines() if "data: video decoder" in line]
    assert len(chosen) == 1, proc.stderr[-4000:]
    assert (
        "data: video decoder pyav (data.video_decoder=auto: torchcodec cannot load (" in chosen[0]
    )
    assert "replacing clip" not in proc.stderr  # no clip failed
    # The resolved config records what was asked; the log said what was chosen.
    assert "video_decoder: auto" in (tmp_path / "run" / "config.yaml").read_text()


def test_torchcodec_named_stops_in_one_line(no_ffmpeg, tmp_path, synth_corpus):
    proc = no_ffmpeg(_train(tmp_path, synth_corpus, "data.video_decoder=torchcodec"), tmp_path)
    assert proc.returncode == 2, f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    [error] = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert error.startswith(
        "avts train: error: config key 'data.video_decoder': torchcodec cannot load ("
    )
    assert "make system-libs" in error and "data.video_decoder=pyav" in error
    assert "replacing clip" not in proc.stderr and "Traceback" not in proc.stderr
    assert "completed" not in proc.stdout
