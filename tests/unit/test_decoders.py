"""data.video_decoder resolved at start (issue 19): auto picks the fastest decoder that loads,
a named one that cannot load stops build_loader in one line before anything is read.

Here a decoder "cannot load" because its import is blocked in ``sys.modules``; the same with
FFmpeg's libraries really hidden is tests/integration/test_decoder_missing.py.
"""

from __future__ import annotations

import logging
import sys

import pytest

import avts_dist.data.decoders as decoders_module
from avts_dist.config import ConfigError, DataConfig
from avts_dist.data import build_loader
from avts_dist.data.decoders import (
    _MODULES,
    AUTO_ORDER,
    DecoderUnavailable,
    _load_failure,
    _torchcodec_cause,
    decoder_load_error,
    resolve_video_decoder,
)
from avts_dist.data.frames import read_frames


@pytest.fixture
def fresh_resolver():
    """Each test resolves from scratch, and leaves no cached answer behind."""
    _load_failure.cache_clear()
    resolve_video_decoder.cache_clear()
    yield
    _load_failure.cache_clear()
    resolve_video_decoder.cache_clear()


# What torchcodec 0.13 raises on import when FFmpeg's libraries are there but unusable.
NO_FFMPEG = RuntimeError(
    "Could not load libtorchcodec. Likely causes: ...\n"
    "OSError: libavutil.so.60: cannot open shared object file: No such file or directory\n"
    "OSError: Could not load this library: /x/libtorchcodec_core8.so\n"
    "OSError: /lib/x86_64-linux-gnu/libavutil.so.57: file too short\n"
    "OSError: Could not load this library: /x/libtorchcodec_core5.so"
)


def _block(monkeypatch, *decoders: str) -> None:
    """Makes the import of these decoders fail as a missing FFmpeg makes torchcodec's fail."""
    real = decoders_module.importlib.import_module
    blocked = {_MODULES[d] for d in decoders}

    def import_module(name: str):
        if name in blocked:
            raise NO_FFMPEG
        return real(name)

    monkeypatch.setattr(decoders_module.importlib, "import_module", import_module)


def test_auto_is_the_default_and_the_fastest_that_loads(fresh_resolver, caplog):
    assert DataConfig().video_decoder == "auto"
    assert AUTO_ORDER == ("torchcodec", "pyav", "decord")
    with caplog.at_level(logging.INFO, logger="avts.data"):
        assert resolve_video_decoder("auto") == "torchcodec"  # all three load here
    [line] = [r.getMessage() for r in caplog.records]
    assert line == (
        "data: video decoder torchcodec (data.video_decoder=auto: the fastest decoder, and it "
        "loads here)"
    )


def test_auto_falls_back_and_says_why(fresh_resolver, monkeypatch, caplog):
    _block(monkeypatch, "torchcodec")
    with caplog.at_level(logging.INFO, logger="avts.data"):
        assert resolve_video_decoder("auto") == "pyav"
    [line] = [r.getMessage() for r in caplog.records]
    assert line == (
        "data: video decoder pyav (data.video_decoder=auto: torchcodec cannot load "
        "(/lib/x86_64-linux-gnu/libavutil.so.57: file too short))"
    )
    _load_failure.cache_clear()
    resolve_video_decoder.cache_clear()
    _block(monkeypatch, "torchcodec", "pyav")
    assert resolve_video_decoder("auto") == "decord"
    _load_failure.cache_clear()
    resolve_video_decoder.cache_clear()
    _block(monkeypatch, "torchcodec", "pyav", "decord")
    with pytest.raises(DecoderUnavailable, match="auto found no decoder that loads") as err:
        resolve_video_decoder("auto")
    assert "\n" not in str(err.value)


def test_a_named_decoder_that_cannot_load_is_one_line_with_the_fix(fresh_resolver, monkeypatch):
    _block(monkeypatch, "torchcodec")
    with pytest.raises(DecoderUnavailable) as err:
        resolve_video_decoder("torchcodec")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("config key 'data.video_decoder': torchcodec cannot load (")
    assert "make system-libs" in message and "data.video_decoder=pyav" in message
    assert isinstance(err.value, ConfigError)  # the CLI prints it as one line, exit 2
    assert resolve_video_decoder("pyav") == "pyav"
    with pytest.raises(DecoderUnavailable, match="is not 'auto' or one of"):
        resolve_video_decoder("ffmpeg")


def test_a_missing_package_names_the_pip_install(fresh_resolver, monkeypatch):
    # A package absent from the environment: its import raises ModuleNotFoundError naming it.
    monkeypatch.delitem(sys.modules, "decord")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if "site-packages" not in p])
    assert decoder_load_error("decord") == (
        "decord cannot load (not installed): pip install decord, or set data.video_decoder=pyav"
    )


def test_torchcodec_load_errors_are_summarised():
    def error(*lines: str) -> RuntimeError:
        return RuntimeError("Could not load libtorchcodec.\n" + "\n".join(lines))

    missing = error(
        "OSError: libavutil.so.60: cannot open shared object file: No such file or directory",
        "OSError: Could not load this library: /x/libtorchcodec_core8.so",
        "OSError: libavutil.so.57: cannot open shared object file: No such file or directory",
    )
    assert _torchcodec_cause(missing)[0] == (
        "no FFmpeg 4-8 shared libraries found: libavutil.so.56-60"
    )
    broken = error(
        "OSError: libavutil.so.60: cannot open shared object file: No such file or directory",
        "OSError: /lib/x86_64-linux-gnu/libavutil.so.57: file too short",
    )
    cause, fix = _torchcodec_cause(broken)
    assert cause == "/lib/x86_64-linux-gnu/libavutil.so.57: file too short"
    assert "make system-libs" in fix
    cuda = error("OSError: libnvrtc.so.13: undefined symbol: foo")
    assert "torchcodec build made for this torch" in _torchcodec_cause(cuda)[1]


def test_build_loader_stops_before_any_read(fresh_resolver, monkeypatch, tmp_path):
    """The URL does not exist: the decoder's error, not the dataset's, shows the check runs
    before the index or any clip is read."""
    _block(monkeypatch, "torchcodec")
    cfg = DataConfig(url=str(tmp_path / "no-such-dataset"), video_decoder="torchcodec")
    with pytest.raises(DecoderUnavailable, match="torchcodec cannot load"):
        build_loader(cfg)


def test_auto_reaches_the_workers_resolved(fresh_resolver, monkeypatch, synth_corpus):
    _block(monkeypatch, "torchcodec")
    loader = build_loader(DataConfig(url=synth_corpus, global_batch_size=2, num_workers=0))
    try:
        assert loader.dataset.video_decoder == "pyav"
        batch = next(iter(loader))
        assert batch["video"].shape == (2, 3, 8, 32, 32)
        assert loader.telemetry()["video_decoder"] == "pyav"
        assert loader.telemetry()["skipped_total"] == 0
    finally:
        loader.close()
    assert loader.cfg.video_decoder == "auto"  # the config keeps what was asked


def test_read_frames_resolves_auto_through_the_same_function(fresh_resolver, monkeypatch):
    from avts_dist.data.synthetic import make_clip

    _, files, _ = make_clip(
        1, seconds=1.0, fps=8.0, size=32, sample_rate=16000, num_classes=2, seed=1
    )
    _block(monkeypatch, "torchcodec")
    frames, _ = read_frames(files["mp4"], 0.0, 4, 8.0, decoder="auto")
    assert frames.shape[0] == 4
    assert resolve_video_decoder("auto") == "pyav"
    assert resolve_video_decoder.cache_info().currsize == 1  # resolved once, then cached
