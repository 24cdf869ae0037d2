"""The embedded synthetic audio-visual corpus, where audio-visual sync is learnable.

Every video shows audio-visual events: at each event an object appears (and fades) on screen and
the audio has a sharp onset (a decaying tone burst) at exactly that time. Each event has a
strength that sets both the object's size and the burst's loudness, so a pair of windows is in
sync only if both the times and the strengths line up.

Two label sets per clip, drawn independently of each other (see :func:`label_plan`):

- ``rhythm`` (the default ``label``): the temporal pattern of the events, what synchronization
  has to learn. Two events per one-second bar, bars back to back from a random phase; the second
  event follows the first by 0.5 s (``even``), 0.375 s (``swing``) or 0.25 s (``gallop``). Any
  one-second window holds exactly two events and, at 8 fps, exactly four frames with the object,
  whatever the class: a single frame or the window's colour histogram tells nothing about it.
- ``appearance``: an identity per class, a shape and colour on screen, a pitch and timbre in the
  audio. For the rhythm labels it is a nuisance factor, and the rhythm is one for these.

``version=2`` (:mod:`avts_dist.data.synthetic_v2`, ``avts synth --version 2``) draws the audio
identity independently of the visual one and jitters the bars, so that only time ties sound to
picture; version 1, the default, is unchanged byte for byte.

Splits are deterministic by key: ``train`` (pretraining, labels never read), ``val`` (sync
validation), ``test`` (held-out sync clips) and the labelled evaluation pool ``eval_train`` /
``eval_test``, disjoint from all of them.

Clips are real MP4 files (H.264 yuv420p + AAC mono) encoded in memory with PyAV, deterministic
for a seed on any storage, serial or parallel (see :func:`encode_mp4` for what that takes).
Rendering and encoding live in :mod:`avts_dist.data.synth_media`, re-exported here.
"""

from __future__ import annotations

import colorsys
import hashlib
import json
from collections import Counter, deque
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from avts_dist.data.index import DatasetIndex
from avts_dist.data.synth_media import (
    AAC_OPTIONS,
    X264_OPTIONS,
    aac_bit_rate,
    encode_mp4,
    render_audio,
    render_video,
    rgb_to_yuv420p,
)
from avts_dist.data.synthetic_v2 import jittered_events
from avts_dist.data.writer import ShardWriter

__all__ = [
    "AAC_OPTIONS",
    "BROKEN_KINDS",
    "VERSIONS",
    "X264_OPTIONS",
    "aac_bit_rate",
    "render_audio",
    "render_video",
    "LABEL_SETS",
    "RHYTHMS",
    "ClassIdentity",
    "class_identity",
    "encode_mp4",
    "label_plan",
    "make_clip",
    "rgb_to_yuv420p",
    "rhythm_events",
    "split_of",
    "synthesize",
    "use_label_set",
]

BROKEN_KINDS = ("truncated", "no_audio", "too_short", "garbage")
SHAPES = ("circle", "square", "triangle", "diamond", "ring", "cross", "hbar", "vbar")
LABEL_SETS = ("rhythm", "appearance")
# Corpus versions: 1 (audio identity = visual identity, one-second bars), 2 (synthetic_v2).
VERSIONS = (1, 2)
# Rhythm class -> delay (s) of the second event after the first, within each bar.
RHYTHMS: dict[str, float] = {"even": 0.5, "swing": 0.375, "gallop": 0.25}
BAR_SECONDS = 1.0
TOO_SHORT_SECONDS = 0.4
# Shorter media is indexed with status "too_short" (below any sensible training clip).
MIN_DURATION = 0.5


@dataclass(frozen=True)
class ClassIdentity:
    name: str
    shape: str
    rgb: tuple[int, int, int]
    pitch_hz: float
    # Relative amplitude of harmonics 1..n: the timbre.
    harmonics: tuple[float, ...]


def class_identity(label: int, num_classes: int, sample_rate: int = 16000) -> ClassIdentity:
    """The appearance class ``label``: shape and colour on screen, pitch and timbre in the audio."""
    shape = SHAPES[label % len(SHAPES)]
    hue = (label / max(num_classes, 1) + 0.37 * (label // len(SHAPES))) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.9, 1.0)
    # Pitches spread over three octaves; keep every harmonic below Nyquist.
    pitch = 180.0 * 2.0 ** (3.0 * label / max(num_classes, 1))
    brightness = 1.0 + (label % 3)
    num_harmonics = max(1, min(5, int((0.45 * sample_rate) // pitch)))
    harmonics = tuple(round(1.0 / k**brightness, 4) for k in range(1, num_harmonics + 1))
    return ClassIdentity(
        name=f"class_{label:03d}_{shape}",
        shape=shape,
        rgb=(int(r * 255), int(g * 255), int(b * 255)),
        pitch_hz=pitch,
        harmonics=harmonics,
    )


def label_names(label_set: str, num_classes: int) -> list[str]:
    """Class names of ``label_set`` (``num_classes`` counts the appearance identities)."""
    if label_set == "rhythm":
        return list(RHYTHMS)
    if label_set == "appearance":
        return [class_identity(c, num_classes).name for c in range(num_classes)]
    raise ValueError(f"label_set must be one of {list(LABEL_SETS)}, got {label_set!r}")


def rhythm_events(
    rng: np.random.Generator, rhythm: int, seconds: float, fps: float
) -> tuple[list[float], list[float]]:
    """Event times (s, on the frame grid) and strengths in [0, 1] of rhythm class ``rhythm``.

    Two events per bar of ``BAR_SECONDS``, the second ``RHYTHMS[name]`` after the first, bars
    back to back from a random phase. The list starts one bar before 0 (times < 0): those events
    are never seen, but their fading objects and decaying bursts reach into the clip, which keeps
    every window of the clip statistically alike (no quiet start that gives the phase away).
    """
    delay = list(RHYTHMS.values())[rhythm]
    bar_frames = max(1, round(BAR_SECONDS * fps))
    phase = int(rng.integers(bar_frames)) / fps
    times: list[float] = []
    bar = -1
    while phase + bar * BAR_SECONDS < seconds:
        for offset in (0.0, delay):
            frame = round((phase + bar * BAR_SECONDS + offset) * fps)
            if frame / fps < seconds:
                times.append(round(frame / fps, 6))
        bar += 1
    strengths = [round(float(s), 4) for s in rng.uniform(0.0, 1.0, size=len(times))]
    return times, strengths


def split_of(
    key: str,
    val_fraction: float,
    test_fraction: float = 0.0,
    eval_train_fraction: float = 0.0,
    eval_test_fraction: float = 0.0,
) -> str:
    """Deterministic by key alone, so a clip keeps its split whatever else is in the corpus."""
    u = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0**64
    for split, fraction in (
        ("val", val_fraction),
        ("test", test_fraction),
        ("eval_train", eval_train_fraction),
        ("eval_test", eval_test_fraction),
    ):
        if u < fraction:
            return split
        u -= fraction
    return "train"


def _stable_id(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big")


def _balanced(seed: int, group: tuple[int, ...], position: int, num_classes: int) -> int:
    """Class of the ``position``-th member of ``group``: every block of ``num_classes`` members
    is a seeded permutation of all classes, so counts within a group differ by one at most."""
    block, slot = divmod(position, num_classes)
    return int(np.random.default_rng([seed, *group, block]).permutation(num_classes)[slot])


def label_plan(
    splits: Sequence[str], num_appearances: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rhythm and appearance class of every clip (in index order), from its split alone.

    Rhythms are balanced within each split, and appearances within each (split, rhythm) group:
    the two label sets are independent by construction, not only in expectation, and neither is
    confounded with the split. Prefix-stable: clip ``i``'s labels depend on clips ``< i`` only,
    so a larger corpus with the same seed extends a smaller one.
    """
    num_rhythms = len(RHYTHMS)
    rhythm = np.zeros(len(splits), dtype=np.int64)
    appearance = np.zeros(len(splits), dtype=np.int64)
    seen: Counter = Counter()
    for i, split in enumerate(splits):
        sid = _stable_id(split)
        rhythm[i] = _balanced(seed, (1, sid), seen[split], num_rhythms)
        seen[split] += 1
        group = (split, int(rhythm[i]))
        appearance[i] = _balanced(seed, (2, sid, group[1]), seen[group], num_appearances)
        seen[group] += 1
    return rhythm, appearance


def make_clip(
    index: int,
    *,
    seconds: float,
    fps: float,
    size: int,
    sample_rate: int,
    num_classes: int,
    seed: int,
    broken: str | None = None,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    eval_train_fraction: float = 0.0,
    eval_test_fraction: float = 0.0,
    rhythm: int | None = None,
    appearance: int | None = None,
    label_set: str = "rhythm",
    version: int = 1,
) -> tuple[str, dict[str, bytes], dict[str, Any]]:
    """One clip: ``(key, {"mp4": ..., "json": ...}, meta)``; a pure function of its arguments.

    ``rhythm`` / ``appearance`` come from :func:`label_plan` in a corpus; left out, they are
    drawn for this clip alone. ``label_set`` names which of them ``meta["label"]`` holds.
    ``version`` 2: the audio identity is drawn on its own and the bars are jittered
    (:mod:`avts_dist.data.synthetic_v2`); ``appearance`` then names what is on screen only.
    """
    key = f"synth_{index:07d}"
    if label_set not in LABEL_SETS:
        raise ValueError(f"label_set must be one of {list(LABEL_SETS)}, got {label_set!r}")
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {list(VERSIONS)}, got {version!r}")
    if rhythm is None or appearance is None:
        draw = np.random.default_rng([seed, index, 1])
        rhythm = int(draw.integers(len(RHYTHMS))) if rhythm is None else rhythm
        appearance = int(draw.integers(num_classes)) if appearance is None else appearance
    if not (0 <= rhythm < len(RHYTHMS) and 0 <= appearance < num_classes):
        raise ValueError(f"clip {key}: rhythm {rhythm} or appearance {appearance} out of range")
    # Content draws come from their own stream: they do not depend on how labels were chosen.
    rng = np.random.default_rng([seed, index])
    ident = class_identity(appearance, num_classes, sample_rate)
    duration = TOO_SHORT_SECONDS if broken == "too_short" else float(seconds)
    num_frames = max(1, round(duration * fps))
    duration = num_frames / fps
    extra: dict[str, Any] = {}
    sound = ident
    if version == 1:
        times, strengths = rhythm_events(rng, rhythm, duration, fps)
    else:
        delay = list(RHYTHMS.values())[rhythm]
        times, strengths, echoes = jittered_events(rng, delay, duration, fps, RHYTHMS.values())
        audio_id = int(np.random.default_rng([seed, index, 3]).integers(num_classes))
        sound = class_identity(audio_id, num_classes, sample_rate)
        extra = dict(version=2, audio_identity=audio_id, audio_identity_name=sound.name)
        # Bar starts are every other event; the first one at t >= 0 is the clip's phase.
        extra |= dict(echoes=echoes, phase=min((t for t in times[::2] if t >= 0), default=0.0))
    frames = render_video(rng, ident, times, strengths, num_frames, fps, size)
    waveform = None
    if broken != "no_audio":
        num_samples = round(duration * sample_rate)
        waveform = render_audio(rng, sound, times, strengths, num_samples, sample_rate)
    mp4 = encode_mp4(frames, fps, waveform, sample_rate)
    if broken == "truncated":
        mp4 = mp4[: len(mp4) * 3 // 5]
    elif broken == "garbage":
        mp4 = rng.integers(0, 256, size=len(mp4), dtype=np.uint8).tobytes()
    rhythm_name = list(RHYTHMS)[rhythm]
    label, class_name = (rhythm, rhythm_name) if label_set == "rhythm" else (appearance, ident.name)
    visible = [i for i, t in enumerate(times) if t >= 0]
    meta = {
        "key": key,
        "label": label,
        "class_name": class_name,
        "label_set": label_set,
        "rhythm": rhythm,
        "rhythm_name": rhythm_name,
        "appearance": appearance,
        "appearance_name": ident.name,
        "split": split_of(
            key, val_fraction, test_fraction, eval_train_fraction, eval_test_fraction
        ),
        "duration": duration,
        "fps": fps,
        "num_frames": num_frames,
        "size": size,
        "sample_rate": sample_rate,
        # Events inside the clip (those of the bar before t = 0 only reach in as fading tails).
        "events": [times[i] for i in visible],
        "event_strengths": [strengths[i] for i in visible],
        # Start of the first bar in the clip (s): a nuisance factor, uniform whatever the rhythm.
        "phase": round(times[0] + BAR_SECONDS, 6),
        "broken": broken,
        "seed": seed,
        **extra,
    }
    return key, {"mp4": mp4, "json": json.dumps(meta, sort_keys=True).encode()}, meta


def broken_plan(num_videos: int, broken_fraction: float, seed: int) -> list[str | None]:
    """Which clips are broken, and how: every kind in turn, on a seeded random subset."""
    if not 0.0 <= broken_fraction <= 1.0:
        raise ValueError(f"broken_fraction must be in [0, 1], got {broken_fraction}")
    num_broken = round(num_videos * broken_fraction)
    plan: list[str | None] = [None] * num_videos
    chosen = np.random.default_rng([seed, 2**31 - 1]).permutation(num_videos)[:num_broken]
    for i, video in enumerate(sorted(chosen.tolist())):
        plan[video] = BROKEN_KINDS[i % len(BROKEN_KINDS)]
    return plan


def _make_clip_star(kwargs: dict[str, Any]) -> tuple[str, dict[str, bytes], dict[str, Any]]:
    return make_clip(**kwargs)


def synthesize(
    url: str,
    num_videos: int,
    seconds: float,
    fps: float,
    size: int,
    sample_rate: int,
    num_classes: int,
    shard_size: int,
    seed: int,
    broken_fraction: float = 0.0,
    val_fraction: float = 0.2,
    storage_options: dict[str, Any] | None = None,
    *,
    test_fraction: float = 0.0,
    eval_train_fraction: float = 0.0,
    eval_test_fraction: float = 0.0,
    label_set: str = "rhythm",
    num_workers: int = 1,
    progress: bool = False,
    version: int = 1,
) -> DatasetIndex:
    """Writes the corpus to ``url`` (any fsspec URL) and returns its committed index.

    ``label`` / ``classes`` hold ``label_set``; both label sets are also the index columns
    ``label_rhythm`` and ``label_appearance``, their names in ``metadata.label_sets`` (see
    :func:`use_label_set`). ``version`` 2 is recorded as ``metadata.version`` (version 1 records
    nothing, so its index keeps its bytes).
    """
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {list(VERSIONS)}, got {version!r}")
    _check(num_videos=num_videos, seconds=seconds, fps=fps, size=size)
    _check(sample_rate=sample_rate, num_classes=num_classes, shard_size=shard_size)
    if size % 2:
        raise ValueError(f"size must be even (yuv420p), got {size}")
    fractions = dict(
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        eval_train_fraction=eval_train_fraction,
        eval_test_fraction=eval_test_fraction,
    )
    if min(fractions.values()) < 0 or sum(fractions.values()) > 1:
        raise ValueError(f"split fractions must be >= 0 and sum to <= 1, got {fractions}")
    if label_set not in LABEL_SETS:
        raise ValueError(f"label_set must be one of {list(LABEL_SETS)}, got {label_set!r}")
    plan = broken_plan(num_videos, broken_fraction, seed)
    splits = [split_of(f"synth_{i:07d}", *fractions.values()) for i in range(num_videos)]
    rhythms, appearances = label_plan(splits, num_classes, seed)
    common = dict(seconds=seconds, fps=fps, size=size, sample_rate=sample_rate)
    common |= dict(num_classes=num_classes, seed=seed, label_set=label_set, **fractions)
    jobs = [
        dict(index=i, broken=plan[i], rhythm=int(rhythms[i]), appearance=int(appearances[i]))
        | common
        | ({"version": version} if version != 1 else {})
        for i in range(num_videos)
    ]
    label_sets = {name: label_names(name, num_classes) for name in LABEL_SETS}
    metadata = {"generator": "avts_dist.data.synthetic", "seed": seed, **common}
    metadata.update(num_videos=num_videos, broken_fraction=broken_fraction, label_sets=label_sets)
    if version != 1:
        metadata["version"] = version
    writer = ShardWriter(
        url,
        shard_size=shard_size,
        storage_options=storage_options,
        classes=label_sets[label_set],
        min_duration=MIN_DURATION,
        metadata=metadata,
    )
    with writer:
        if num_workers > 1:
            pool = ProcessPoolExecutor(num_workers)
            clips = _bounded_map(pool, jobs, window=8 * num_workers)
        else:
            pool = None
            clips = map(_make_clip_star, jobs)
        try:
            if progress:
                from tqdm import tqdm

                clips = tqdm(clips, total=num_videos, desc="synth", unit="clip")
            # Results arrive in index order whatever the pool does: shard bytes stay deterministic.
            for key, files, meta in clips:
                writer.add(
                    key,
                    files,
                    label=meta["label"],
                    split=meta["split"],
                    broken=meta["broken"] or "",
                    label_rhythm=meta["rhythm"],
                    label_appearance=meta["appearance"],
                )
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
        return writer.close()


def use_label_set(idx: DatasetIndex, label_set: str) -> DatasetIndex:
    """The same index with ``label`` / ``classes`` taken from another recorded label set (the
    ``label_<name>`` column and ``metadata.label_sets[name]``); rows and bytes are unchanged."""
    recorded = idx.header.get("metadata", {}).get("label_sets", {})
    if label_set not in recorded or f"label_{label_set}" not in idx.extra_columns:
        raise ValueError(
            f"{idx.url}: no label set {label_set!r} recorded (it has {sorted(recorded) or 'none'})"
        )
    columns = dict(idx._columns)  # the stored arrays are shared, not copied
    columns["label"] = idx.column(f"label_{label_set}").astype(np.int32)
    header = {**idx.header, "classes": list(recorded[label_set])}
    header["metadata"] = {**header.get("metadata", {}), "label_set": label_set}
    return DatasetIndex(columns, header, idx.url, idx.storage_options)


def _bounded_map(pool: ProcessPoolExecutor, jobs: list[dict], window: int):
    """``pool.map`` in index order with at most ``window`` clips in flight, so encoded clips
    never pile up in memory when the writer (probe + upload) is the slower side."""
    pending: deque = deque()
    for job in jobs:
        pending.append(pool.submit(_make_clip_star, job))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _check(**values: float) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")
