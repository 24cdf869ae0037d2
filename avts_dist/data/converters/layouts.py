"""Parsers for the real on-disk layouts: each returns a :class:`Layout` (classes, items, skips).

Parsing only reads directory listings and metadata files; media is touched later, in parallel.
Per-split membership goes into extra index columns:

- UCF101/HMDB51: ``split1``..``split3`` with ``train``/``test``/``unused``; the index ``split`` is
  split 1's value.
- ESC-50: ``fold`` (1-5); DCASE: ``fold`` (the fold whose test list holds the file) plus
  ``fold1``..``foldK`` with ``train``/``test``/``unused``; the index ``split`` is ``fold<N>``.
- AudioSet/Kinetics: the CSV's split (``train``/``val``/``test`` / the CSV file name).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["LAYOUTS", "Item", "Layout", "LayoutError", "safe_key"]

VIDEO_EXTS = {".avi", ".mp4", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".flv"}
AUDIO_EXTS = {".wav", ".flac", ".mp3", ".ogg", ".m4a", ".aac"}


class LayoutError(ValueError):
    """The source directory does not have the expected layout; the message says what is missing."""


@dataclass
class Item:
    key: str
    path: Path
    label: int
    split: str
    extra: dict[str, Any] = field(default_factory=dict)
    # The listed [start, end] seconds in the source video (AudioSet/Kinetics); the converter
    # probes the file's duration and cuts it there when it is an untrimmed download.
    segment: tuple[float, float] | None = None
    # Whether the file's name gives the segment (<id>_<start>...), not only the YouTube id.
    named_by_segment: bool = False


@dataclass
class Layout:
    classes: list[str]
    items: list[Item]
    audio_only: bool = False
    # (source path or id, reason) for everything left out while parsing.
    skipped: list[tuple[str, str]] = field(default_factory=list)


def safe_key(text: str) -> str:
    """A webdataset-safe key: no dots (they separate key and extension), no slashes."""
    return re.sub(r"[^A-Za-z0-9_\-]", "_", text)


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise LayoutError(f"{what} not found: {path}")
    return path


def _find_dir(src: Path, names: tuple[str, ...], what: str) -> Path:
    for name in names:
        for cand in (src / name, *src.glob(f"*/{name}")):
            if cand.is_dir():
                return cand
    raise LayoutError(f"{what} not found under {src} (looked for {', '.join(names)})")


def _unique(items: list[Item]) -> list[Item]:
    seen: dict[str, int] = {}
    for item in items:
        n = seen.get(item.key, 0)
        seen[item.key] = n + 1
        if n:
            item.key = f"{item.key}-{n}"
    return items


# ---------------------------------------------------------------------------------------------


def parse_ucf101(src: Path) -> Layout:
    video_root = _find_dir(src, ("UCF-101", "UCF101"), "UCF-101 video folder")
    lists = _find_dir(src, ("ucfTrainTestlist",), "ucfTrainTestlist folder")
    classes: list[str] = []
    for line in _require(lists / "classInd.txt", "classInd.txt").read_text().splitlines():
        if line.strip():
            classes.append(line.split()[1])
    membership: dict[str, dict[str, str]] = {}
    for k in (1, 2, 3):
        for kind in ("train", "test"):
            f = lists / f"{kind}list0{k}.txt"
            if not f.exists():
                raise LayoutError(f"split file missing: {f}")
            for line in f.read_text().splitlines():
                if line.strip():
                    rel = line.split()[0].replace("\\", "/")
                    membership.setdefault(Path(rel).name, {})[f"split{k}"] = kind
    cls_index = {c.lower(): i for i, c in enumerate(classes)}
    items, skipped = [], []
    for path in sorted(video_root.glob("*/*")):
        if path.suffix.lower() not in VIDEO_EXTS:
            continue
        label = cls_index.get(path.parent.name.lower())
        if label is None:
            skipped.append((str(path), "class_not_in_classInd"))
            continue
        m = membership.get(path.name, {})
        extra = {f"split{k}": m.get(f"split{k}", "unused") for k in (1, 2, 3)}
        extra["source"] = f"{path.parent.name}/{path.name}"
        items.append(Item(safe_key(path.stem), path, label, extra["split1"], extra))
    listed = set(membership) - {i.path.name for i in items}
    skipped += [(name, "missing_file") for name in sorted(listed)]
    return Layout(classes, _unique(items), skipped=skipped)


def parse_hmdb51(src: Path) -> Layout:
    splits_dir = _find_dir(
        src, ("testTrainMulti_7030_splits", "test_train_splits"), "HMDB51 split folder"
    )
    marker = {"0": "unused", "1": "train", "2": "test"}
    membership: dict[tuple[str, str], dict[str, str]] = {}
    classes_set = set()
    for f in sorted(splits_dir.glob("*_test_split[123].txt")):
        m = re.fullmatch(r"(.+)_test_split([123])\.txt", f.name)
        cls, k = m.group(1), m.group(2)
        classes_set.add(cls)
        for line in f.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2:
                membership.setdefault((cls, parts[0]), {})[f"split{k}"] = marker.get(
                    parts[1], "unused"
                )
    if not classes_set:
        raise LayoutError(f"no <class>_test_split<k>.txt files in {splits_dir}")
    classes = sorted(classes_set)
    cls_index = {c: i for i, c in enumerate(classes)}
    items, skipped = [], []
    # Videos may sit at <src>/<class>/ or one level deeper (e.g. hmdb51_org/<class>/).
    for path in sorted([*src.glob("*/*"), *src.glob("*/*/*")]):
        if path.suffix.lower() not in VIDEO_EXTS or path.parent == splits_dir:
            continue
        cls = path.parent.name
        if cls not in cls_index:
            skipped.append((str(path), "class_without_split_files"))
            continue
        m = membership.get((cls, path.name))
        if m is None:
            skipped.append((str(path), "not_in_split_files"))
            continue
        extra = {f"split{k}": m.get(f"split{k}", "unused") for k in (1, 2, 3)}
        extra["source"] = f"{cls}/{path.name}"
        key = safe_key(f"{cls}__{path.stem}")
        items.append(Item(key, path, cls_index[cls], extra["split1"], extra))
    present = {(i.path.parent.name, i.path.name) for i in items}
    skipped += [(f"{c}/{n}", "missing_file") for (c, n) in sorted(set(membership) - present)]
    return Layout(classes, _unique(items), skipped=skipped)


def parse_esc50(src: Path) -> Layout:
    meta = _require(src / "meta" / "esc50.csv", "ESC-50 meta/esc50.csv")
    audio_dir = _require(src / "audio", "ESC-50 audio folder")
    with meta.open(newline="") as f:
        rows = list(csv.DictReader(f))
    need = {"filename", "fold", "target", "category"}
    if not rows or not need <= set(rows[0]):
        raise LayoutError(f"{meta}: expected columns {sorted(need)}")
    names = {int(r["target"]): r["category"] for r in rows}
    classes = [names.get(i, f"class_{i}") for i in range(max(names) + 1)]
    items, skipped = [], []
    for r in rows:
        path = audio_dir / r["filename"]
        if not path.exists():
            skipped.append((r["filename"], "missing_file"))
            continue
        extra = {"fold": int(r["fold"]), "esc10": str(r.get("esc10", "")).lower() == "true"}
        extra["source"] = r["filename"]
        items.append(Item(safe_key(path.stem), path, int(r["target"]), f"fold{r['fold']}", extra))
    return Layout(classes, _unique(items), audio_only=True, skipped=skipped)


def parse_dcase2014(src: Path) -> Layout:  # noqa: C901 - several folder variants; split later
    """DCASE scene classification: wav files plus ``evaluation_setup/fold<N>_{train,test}.txt``.

    Lines are ``<relative wav path>[<TAB><scene label>]`` (the DCASE/TUT setup format); a test
    list without labels takes the label from the train lists of the other folds.
    """
    setup = _find_dir(src, ("evaluation_setup",), "DCASE evaluation_setup folder")
    folds: dict[int, dict[str, list[tuple[str, str | None]]]] = {}
    for f in sorted(setup.glob("fold*_*.txt")):
        m = re.fullmatch(r"fold(\d+)_(train|test|evaluate)\.txt", f.name)
        if not m:
            continue
        kind = "test" if m.group(2) in ("test", "evaluate") else "train"
        rows = folds.setdefault(int(m.group(1)), {"train": [], "test": []})[kind]
        for line in f.read_text().splitlines():
            parts = [p for p in re.split(r"\t|\s{2,}", line.strip()) if p]
            if parts:
                rows.append((parts[0], parts[1] if len(parts) > 1 else None))
    if not folds:
        raise LayoutError(f"no fold<N>_train.txt / fold<N>_test.txt files in {setup}")
    labels: dict[str, str] = {}
    for fold in folds.values():
        for kind in ("train", "test"):
            for rel, lab in fold[kind]:
                if lab:
                    labels[rel] = lab
    classes = sorted(set(labels.values()))
    cls_index = {c: i for i, c in enumerate(classes)}
    fold_ids = sorted(folds)
    items, skipped = [], []
    all_files = sorted({rel for f in folds.values() for k in f.values() for rel, _ in k})
    for rel in all_files:
        path = src / rel
        if not path.exists():
            path = src / "audio" / Path(rel).name
        if not path.exists():
            skipped.append((rel, "missing_file"))
            continue
        if rel not in labels:
            skipped.append((rel, "no_label"))
            continue
        extra: dict[str, Any] = {}
        test_fold = 0
        for k in fold_ids:
            kinds = [kind for kind in ("train", "test") if rel in {r for r, _ in folds[k][kind]}]
            extra[f"fold{k}"] = kinds[0] if kinds else "unused"
            if "test" in kinds and not test_fold:
                test_fold = k
        extra["fold"] = test_fold
        extra["source"] = rel
        split = f"fold{test_fold}" if test_fold else "unused"
        items.append(Item(safe_key(Path(rel).stem), path, cls_index[labels[rel]], split, extra))
    return Layout(classes, _unique(items), audio_only=True, skipped=skipped)


def _media_by_stem(src: Path) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for p in src.rglob("*"):
        if p.suffix.lower() in VIDEO_EXTS | AUDIO_EXTS and p.is_file():
            out.setdefault(p.stem, []).append(p)
    return out


def _match_clip(
    by_stem: dict[str, list[Path]], ytid: str, start: float, end: float
) -> tuple[Path, bool] | None:
    """Finds a downloaded clip by YouTube id and start time, in the usual naming schemes:
    ``<id>_<start:06d>_<end:06d>`` (Kinetics downloaders), ``<id>_<start>`` / ``<id>_<start ms>``,
    ``Y<id>``, or just ``<id>`` (one clip per id). Returns ``(path, named_by_segment)``: False
    for an id-only match, which may be the whole untrimmed video."""
    s, e = int(round(start)), int(round(end))
    by_segment = (
        f"{ytid}_{s:06d}_{e:06d}",
        f"{ytid}_{s}_{e}",
        f"{ytid}_{start:.3f}_{end:.3f}",
        f"{ytid}_{start:.1f}",
        f"{ytid}_{s}",
        f"{ytid}_{s * 1000}",
        f"Y{ytid}_{start:.3f}_{end:.3f}",
    )
    for stem in (*by_segment, f"Y{ytid}", ytid):
        if stem in by_stem:
            return by_stem[stem][0], stem in by_segment
    return None


def _read_segment_csv(path: Path) -> list[list[str]]:
    rows = []
    with path.open(newline="") as f:
        for row in csv.reader(f, skipinitialspace=True):
            if row and not row[0].startswith("#"):
                rows.append([c.strip() for c in row])
    return rows


def parse_audioset(src: Path) -> Layout:
    """AudioSet: segment CSVs (``YTID, start_seconds, end_seconds, positive_labels``, ``#`` header
    lines) + downloaded clips. The label is the first positive label (mid); all labels are kept in
    the ``labels`` column. Split = the CSV's name (``balanced_train_segments`` -> ``balanced_train``).
    Class names come from ``class_labels_indices.csv`` when present (index, mid, display_name)."""
    csvs = sorted(p for p in src.rglob("*segments*.csv"))
    if not csvs:
        raise LayoutError(f"no AudioSet segment CSV (*segments*.csv) under {src}")
    names: dict[str, str] = {}
    ontology = next(iter(src.rglob("class_labels_indices.csv")), None)
    if ontology:
        with ontology.open(newline="") as f:
            for r in csv.DictReader(f):
                names[r["mid"]] = r["display_name"]
    by_stem = _media_by_stem(src)
    segments = []
    for path in csvs:
        split = path.stem.replace("_segments", "")
        for row in _read_segment_csv(path):
            if len(row) < 4:
                continue
            try:
                start, end = float(row[1]), float(row[2])
            except ValueError:
                continue  # a header row
            labels = ",".join(row[3:]).strip('"').split(",")
            segments.append((row[0], start, end, [x.strip() for x in labels if x.strip()], split))
    mids = sorted({m for seg in segments for m in seg[3]})
    classes = [names.get(m, m) for m in mids]
    mid_index = {m: i for i, m in enumerate(mids)}
    items, skipped = [], []
    for ytid, start, end, labels, split in segments:
        match = _match_clip(by_stem, ytid, start, end)
        if match is None:
            skipped.append((f"{ytid}@{start:g}", "missing_file"))
            continue
        path, named = match
        key = safe_key(f"{ytid}_{int(start * 1000):08d}")
        extra = {"labels": ";".join(labels), "youtube_id": ytid, "source": path.name}
        label = mid_index[labels[0]] if labels else -1
        items.append(Item(key, path, label, split, extra, (start, end), named))
    return Layout(classes, _unique(items), skipped=skipped)


def parse_kinetics(src: Path) -> Layout:
    """Kinetics: CSV(s) ``label,youtube_id,time_start,time_end,split`` + clips, matched by id and
    start time (``<id>_<start:06d>_<end:06d>.mp4``, the official downloader's naming)."""
    csvs = [p for p in sorted(src.rglob("*.csv"))]
    rows: list[dict[str, str]] = []
    for path in csvs:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            if {"label", "youtube_id", "time_start", "time_end"} <= set(reader.fieldnames or []):
                for r in reader:
                    r.setdefault("split", path.stem)
                    rows.append(r)
    if not rows:
        raise LayoutError(
            f"no Kinetics CSV with columns label,youtube_id,time_start,time_end[,split] under {src}"
        )
    classes = sorted({r["label"] for r in rows if r.get("label")})
    cls_index = {c: i for i, c in enumerate(classes)}
    by_stem = _media_by_stem(src)
    items, skipped = [], []
    for r in rows:
        start, end = float(r["time_start"]), float(r["time_end"])
        match = _match_clip(by_stem, r["youtube_id"], start, end)
        if match is None:
            skipped.append((f"{r['youtube_id']}@{start:g}", "missing_file"))
            continue
        path, named = match
        key = safe_key(f"{r['youtube_id']}_{int(start):06d}_{int(end):06d}")
        split = {"validate": "val"}.get(r.get("split") or "train", r.get("split") or "train")
        extra = {"youtube_id": r["youtube_id"], "source": path.name}
        label = cls_index.get(r.get("label", ""), -1)
        items.append(Item(key, path, label, split, extra, (start, end), named))
    return Layout(classes, _unique(items), skipped=skipped)


def parse_folder(src: Path) -> Layout:
    """``<class>/<file>``; optionally ``<split>/<class>/<file>`` when the top level is only
    split names (train/val/test)."""
    top = sorted(p for p in src.iterdir() if p.is_dir())
    split_names = {"train", "val", "test", "validation"}
    roots = (
        [(p.name, p) for p in top]
        if top and {p.name for p in top} <= split_names
        else [("train", src)]
    )
    classes = sorted({c.name for _, r in roots for c in r.iterdir() if c.is_dir()})
    if not classes:
        raise LayoutError(f"no class folders in {src} (expected <class>/<file>)")
    cls_index = {c: i for i, c in enumerate(classes)}
    items, skipped = [], []
    exts = VIDEO_EXTS | AUDIO_EXTS
    found_video = False
    for split, root in roots:
        for path in sorted(root.glob("*/*")):
            if not path.is_file():
                continue
            if path.suffix.lower() not in exts:
                skipped.append((str(path), "not_media"))
                continue
            found_video |= path.suffix.lower() in VIDEO_EXTS
            key = safe_key(f"{path.parent.name}__{path.stem}")
            extra = {"source": f"{path.parent.name}/{path.name}"}
            items.append(Item(key, path, cls_index[path.parent.name], split, extra))
    return Layout(classes, _unique(items), audio_only=not found_video, skipped=skipped)


LAYOUTS: dict[str, Callable[[Path], Layout]] = {
    "ucf101": parse_ucf101,
    "hmdb51": parse_hmdb51,
    "esc50": parse_esc50,
    "dcase2014": parse_dcase2014,
    "audioset": parse_audioset,
    "kinetics": parse_kinetics,
    "folder": parse_folder,
}
