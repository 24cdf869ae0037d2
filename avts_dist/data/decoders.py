"""Which video decoder this process uses: ``data.video_decoder`` resolved, checked at start.

``auto`` (the default) is the fastest decoder that loads here, in the order of
docs/benchmarks.md: torchcodec, then PyAV, then decord. A decoder named explicitly that cannot
load stops the caller (``build_loader``, an evaluation job) before any clip is read, with one
line: what failed to load and the fix. Without this check a missing FFmpeg fails every clip, one
at a time, until the skip budget stops training (issue 19).

torchcodec loads FFmpeg's shared libraries (4 to 8) when it is imported; PyAV and decord bring
their own in their wheels. So "loads" is "imports": the check costs one import per decoder and
per process, and forked loader workers inherit its answer.
"""

from __future__ import annotations

import functools
import importlib
import logging
import re

from avts_dist.config import VIDEO_DECODERS, ConfigError

__all__ = [
    "AUTO",
    "AUTO_ORDER",
    "DecoderUnavailable",
    "decoder_load_error",
    "resolve_video_decoder",
]

log = logging.getLogger("avts.data")

AUTO = "auto"
# The order auto tries them in: fastest first, measured side by side (docs/benchmarks.md).
AUTO_ORDER = ("torchcodec", "pyav", "decord")
# What a decoder's import loads; torchcodec.decoders pulls in its FFmpeg-linked core library.
_MODULES = {"torchcodec": "torchcodec.decoders", "pyav": "av", "decord": "decord"}
_PACKAGES = {"torchcodec": "torchcodec", "pyav": "av", "decord": "decord"}
FFMPEG_FIX = (
    "install FFmpeg 4-8's shared libraries (make system-libs; Debian: libavcodec59 libavformat59 "
    "libavutil57) or set data.video_decoder=pyav"
)
_TORCH_FIX = (
    "install the torchcodec build made for this torch (README) or set data.video_decoder=pyav"
)


class DecoderUnavailable(ConfigError):
    """``data.video_decoder`` names a decoder that cannot load in this process."""


def _torchcodec_cause(exc: BaseException) -> tuple[str, str]:
    """torchcodec's load error (a traceback per FFmpeg version it tried) in a few words, and
    its fix."""
    text = str(exc)
    # The dynamic loader's own words: 'libavutil.so.57: file too short', 'undefined symbol ...'.
    tried = [
        m for m in re.findall(r"OSError: (.*)", text) if "Could not load this library" not in m
    ]
    found = [m for m in tried if "cannot open shared object file" not in m]
    if any(word in m for m in found for word in ("undefined symbol", "nvrtc", "c10_cuda")):
        return found[0], _TORCH_FIX
    if found:
        return found[0], FFMPEG_FIX
    if tried:
        return "no FFmpeg 4-8 shared libraries found: libavutil.so.56-60", FFMPEG_FIX
    return _one_line(exc), FFMPEG_FIX


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {lines[0] if lines else ''}"


@functools.cache
def _load_failure(name: str) -> tuple[str, str] | None:
    """``(what failed to load, the fix)``, or None when decoder ``name`` loads here."""
    try:
        importlib.import_module(_MODULES[name])
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] == _PACKAGES[name]:
            return "not installed", f"pip install {_PACKAGES[name]}, or set data.video_decoder=pyav"
        return _one_line(exc), FFMPEG_FIX
    except Exception as exc:  # torchcodec raises RuntimeError when no FFmpeg loads
        if name == "torchcodec":
            return _torchcodec_cause(exc)
        return _one_line(exc), FFMPEG_FIX
    return None


def decoder_load_error(name: str) -> str | None:
    """None when decoder ``name`` loads in this process, else one line: what failed and the fix."""
    failure = _load_failure(name)
    if failure is None:
        return None
    cause, fix = failure
    return f"{name} cannot load ({cause[:200]}): {fix}"


@functools.cache
def resolve_video_decoder(name: str) -> str:
    """The decoder to use for ``data.video_decoder`` = ``name``: itself when it loads; for
    ``auto`` the first of :data:`AUTO_ORDER` that loads, said in one log line (once per
    process) with the reason. Raises :class:`DecoderUnavailable`, one line, otherwise."""
    if name != AUTO and name not in VIDEO_DECODERS:
        raise DecoderUnavailable(
            f"config key 'data.video_decoder': {name!r} is not {AUTO!r} or one of {VIDEO_DECODERS}"
        )
    if name != AUTO:
        error = decoder_load_error(name)
        if error is not None:
            raise DecoderUnavailable(f"config key 'data.video_decoder': {error}")
        return name
    skipped = []
    for candidate in AUTO_ORDER:
        failure = _load_failure(candidate)
        if failure is None:
            why = "; ".join(skipped) if skipped else "the fastest decoder, and it loads here"
            log.info("data: video decoder %s (data.video_decoder=auto: %s)", candidate, why)
            return candidate
        skipped.append(f"{candidate} cannot load ({failure[0][:200]})")
    raise DecoderUnavailable(
        f"config key 'data.video_decoder': auto found no decoder that loads ({'; '.join(skipped)}): "
        "pip install av"
    )
