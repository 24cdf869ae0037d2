"""Real dataset layouts -> the shard format (contract A), in parallel and resumably.

``prepare(name, src, out)`` runs in two phases:

1. **Convert** (expensive, parallel): the parsed items, sorted by key, are cut into fixed chunks;
   a process pool converts each chunk (video -> the training profile's MP4, or the source
   untouched with ``copy``; audio -> WAV; see :mod:`.media`) into a local *part*
   ``<work>/part-NNNNNN.tar`` plus ``part-NNNNNN.json`` (items kept and skipped with the reason).
   AudioSet/Kinetics files are probed and cut to their listed segment when longer. The JSON is written last and atomically: it is the progress
   manifest. A rerun skips every chunk whose manifest exists, so an interrupted conversion resumes
   where it stopped.
2. **Write** (cheap, sequential): the parts are streamed in order into :class:`ShardWriter`,
   which probes the media, uploads shards (local or ``s3://``) and writes ``index.npz`` last,
   with the profile in its header.

A report (``prepare_report.json`` next to the index, and on stdout) lists what was skipped and why,
including the shard probe's status per clip (e.g. videos without audio are kept, ``no_audio``).
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import shutil
import tarfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from avts_dist.data.converters.layouts import LAYOUTS, Item, Layout, LayoutError
from avts_dist.data.converters.media import (
    EncodeProfile,
    MediaError,
    audio_to_wav,
    media_duration,
    segment_cut,
    video_to_mp4,
)
from avts_dist.storage import is_remote, local_path

__all__ = ["LAYOUTS", "EncodeProfile", "LayoutError", "PrepareReport", "prepare"]

FORMAT = 2
# What audio-only datasets (ESC-50, DCASE) store, for the index header.
WAV_PROFILE = {"name": "wav", "audio": "PCM WAV: WAV sources copied, others 16-bit mono"}


@dataclass
class PrepareReport:
    dataset: str
    src: str
    out: str
    num_items: int = 0
    num_written: int = 0
    num_chunks: int = 0
    num_chunks_resumed: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_items: list[list[str]] = field(default_factory=list)
    status: dict[str, int] = field(default_factory=dict)
    num_without_audio: int = 0
    classes: int = 0

    def summary(self) -> str:
        lines = [
            f"prepared {self.dataset}: {self.num_written}/{self.num_items} items written to "
            f"{self.out} ({self.classes} classes; {self.num_chunks_resumed}/{self.num_chunks} "
            "chunks reused from an earlier run)",
            f"  probe status: {dict(sorted(self.status.items()))}"
            f"; without audio: {self.num_without_audio}",
        ]
        if self.skipped:
            lines.append(f"  skipped: {dict(sorted(self.skipped.items()))}")
            for src, reason in self.skipped_items[:10]:
                lines.append(f"    {reason}: {src}")
            if len(self.skipped_items) > 10:
                lines.append(f"    ... {len(self.skipped_items) - 10} more in prepare_report.json")
        return "\n".join(lines)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _convert_item(
    item: Item, audio_only: bool, profile: EncodeProfile
) -> tuple[dict[str, bytes], tuple[float, float] | None]:
    """The member bytes of one item, and the ``(start, end)`` it was cut to (None: whole)."""
    cut = None
    if item.segment is not None:
        duration = media_duration(item.path)
        cut = segment_cut(duration, *item.segment, named_by_segment=item.named_by_segment)
    lo, hi = cut or (None, None)
    if audio_only:
        return {"wav": audio_to_wav(item.path, start_s=lo, end_s=hi)}, cut
    mp4, _ = video_to_mp4(item.path, profile, start_s=lo, end_s=hi)
    return {"mp4": mp4}, cut


def _convert_chunk(
    part: str, items: list[Item], audio_only: bool, profile: EncodeProfile, work: str
) -> dict[str, Any]:
    """Runs in a worker process: converts one chunk into a local part tar + manifest."""
    kept, skipped = [], []
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for item in items:
            try:
                files, cut = _convert_item(item, audio_only, profile)
            except MediaError as exc:
                skipped.append([str(item.path), str(exc)])
                continue
            except Exception as exc:  # a decoder crash on one file must not stop the chunk
                skipped.append([str(item.path), f"unreadable: {type(exc).__name__}"])
                continue
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{item.key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            kept.append(
                {
                    "key": item.key,
                    "label": item.label,
                    "split": item.split,
                    "extra": item.extra,
                    "exts": sorted(files),
                    "cut": cut,
                }
            )
    work_dir = Path(work)
    _atomic_write(work_dir / f"{part}.tar", buf.getvalue())
    manifest = {"format": FORMAT, "kept": kept, "skipped": skipped}
    _atomic_write(work_dir / f"{part}.json", json.dumps(manifest).encode())
    return manifest


def _fingerprint(name: str, layout: Layout, profile: EncodeProfile) -> str:
    settings = json.dumps(profile.header(), sort_keys=True)
    h = hashlib.sha1(f"{FORMAT}|{name}|{settings}|{layout.audio_only}".encode())
    for item in layout.items:
        h.update(f"{item.key}|{item.path}|{item.label}|{item.split}\n".encode())
    return h.hexdigest()[:16]


def default_work_dir(name: str, out: str) -> Path:
    if not is_remote(out):
        return Path(local_path(out)) / ".prepare-work"
    digest = hashlib.sha1(out.encode()).hexdigest()[:12]
    return (
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        / "avts_dist"
        / (f"prepare-{name}-{digest}")
    )


def prepare(  # noqa: C901 - one pipeline of steps with their checks; split later
    name: str,
    src: str | Path,
    out: str,
    *,
    workers: int = 1,
    shard_size: int = 64,
    chunk_size: int = 16,
    profile: EncodeProfile | None = None,
    work_dir: str | Path | None = None,
    storage_options: dict[str, Any] | None = None,
    progress: bool = True,
    limit: int = 0,
    keep_work: bool = False,
) -> PrepareReport:
    """Converts dataset ``name`` (a key of :data:`LAYOUTS`) at ``src`` into shards at ``out``,
    video in ``profile`` (default: the training profile)."""
    from tqdm.auto import tqdm

    from avts_dist.data.writer import ShardWriter
    from avts_dist.storage import get_fs, join

    if name not in LAYOUTS:
        raise LayoutError(f"unknown dataset {name!r}; expected one of {sorted(LAYOUTS)}")
    src = Path(src)
    if not src.is_dir():
        raise LayoutError(f"source folder not found: {src}")
    layout = LAYOUTS[name](src)
    layout.items.sort(key=lambda it: it.key)
    if limit:
        layout.items = layout.items[:limit]
    report = PrepareReport(dataset=name, src=str(src), out=out, num_items=len(layout.items))
    report.classes = len(layout.classes)
    if not layout.items:
        raise LayoutError(f"no {name} media found under {src}")

    work = Path(work_dir) if work_dir else default_work_dir(name, out)
    work.mkdir(parents=True, exist_ok=True)
    stamp = work / "fingerprint"
    profile = profile or EncodeProfile()
    fp = _fingerprint(name, layout, profile)
    if stamp.exists() and stamp.read_text() != fp:
        # Different inputs: the old parts are stale, never mix them in.
        for p in work.glob("part-*"):
            p.unlink()
    stamp.write_text(fp)

    chunks = [layout.items[i : i + chunk_size] for i in range(0, len(layout.items), chunk_size)]
    report.num_chunks = len(chunks)
    manifests: dict[int, dict[str, Any]] = {}
    todo = []
    for i in range(len(chunks)):
        mpath = work / f"part-{i:06d}.json"
        if mpath.exists() and (work / f"part-{i:06d}.tar").exists():
            manifests[i] = json.loads(mpath.read_text())
            report.num_chunks_resumed += 1
        else:
            todo.append(i)

    bar = tqdm(total=len(layout.items), desc=f"convert {name}", unit="clip", disable=not progress)
    bar.update(sum(len(chunks[i]) for i in manifests))
    args = [(f"part-{i:06d}", chunks[i], layout.audio_only, profile, str(work)) for i in todo]
    if workers > 1 and len(todo) > 1:
        # fork: workers start at once (spawn would re-import torch via avts_dist.data); the
        # workers only use PyAV, never a thread pool inherited from the parent.
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = {pool.submit(_convert_chunk, *a): i for i, a in zip(todo, args, strict=True)}
            for fut in as_completed(futures):
                manifests[futures[fut]] = fut.result()
                bar.update(len(chunks[futures[fut]]))
    else:
        for i, a in zip(todo, args, strict=True):
            manifests[i] = _convert_chunk(*a)
            bar.update(len(chunks[i]))
    bar.close()

    skipped = [tuple(s) for s in layout.skipped]
    for i in range(len(chunks)):
        skipped += [tuple(s) for s in manifests[i]["skipped"]]
    report.skipped_items = [list(s) for s in skipped]
    report.skipped = dict(Counter(reason.split(":")[0] for _, reason in skipped))

    # Action datasets keep silent videos as usable rows (status "ok", has_audio False): about half
    # of UCF101 has no audio track. Pretraining corpora need audio, so the probe flags them.
    writer = ShardWriter(
        out,
        shard_size=shard_size,
        storage_options=storage_options,
        classes=layout.classes,
        members=("wav", "json") if layout.audio_only else ("mp4", "json"),
        need_audio=name not in ("ucf101", "hmdb51", "folder"),
        metadata={"source_dataset": name, "prepare_fingerprint": fp},
        profile=WAV_PROFILE if layout.audio_only else profile.header(),
    )
    for i in range(len(chunks)):
        with tarfile.open(work / f"part-{i:06d}.tar") as tar:
            members = {m.name: m for m in tar.getmembers()}
            for rec in manifests[i]["kept"]:
                files = {
                    ext: tar.extractfile(members[f"{rec['key']}.{ext}"]).read()
                    for ext in rec["exts"]
                }
                label = rec["label"]
                meta = {
                    "key": rec["key"],
                    "label": label,
                    "class_name": layout.classes[label] if 0 <= label < len(layout.classes) else "",
                    "split": rec["split"],
                    **rec["extra"],
                }
                if rec.get("cut"):
                    meta["cut_s"] = rec["cut"]  # where the source was cut (segment seconds)
                files["json"] = json.dumps(meta, sort_keys=True).encode()
                writer.add(rec["key"], files, label, rec["split"], **rec["extra"])
                report.num_written += 1
    if report.num_written == 0:
        raise LayoutError(f"every {name} item was skipped: {report.skipped}")
    index = writer.close()
    status = [str(s) for s in index.status]
    report.status = dict(Counter(status))
    report.num_without_audio = int((~index.has_audio.astype(bool)).sum())

    fs, root = get_fs(out, storage_options)
    with fs.open(join(root, "prepare_report.json"), "w") as f:
        json.dump(asdict(report), f, indent=1)
    if not keep_work:
        # The chunks only serve an interrupted run; once the index is committed they are a copy.
        shutil.rmtree(work, ignore_errors=True)
    return report
