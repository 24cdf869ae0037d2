"""avts prepare: convert a real dataset layout into shards.

  avts prepare ucf101   --src /data/UCF101   --out s3://bucket/ucf101 --workers 8
  avts prepare hmdb51   --src /data/hmdb51   --out data/hmdb51
  avts prepare esc50    --src /data/ESC-50   --out data/esc50
  avts prepare dcase2014 --src /data/dcase   --out data/dcase2014
  avts prepare audioset --src /data/audioset --out s3://bucket/audioset
  avts prepare kinetics --src /data/kinetics --out s3://bucket/kinetics
  avts prepare folder   --src /data/mine     --out data/mine     (<class>/<file>)

Video is written in the training profile by default: H.264 yuv420p at short side 128
(--short-side; never upscaled), a fixed frame rate (--fps; default the source's, capped at 30), a
keyframe every second, AAC mono at --sample-rate (default data.sample_rate's default, 16000: use
your training config's), faststart. --copy keeps H.264/AAC MP4 sources byte for byte (others are
transcoded to H.264/AAC MP4 at their own size and rate). AudioSet and Kinetics files longer than
their listed segment are cut to it. The profile is recorded in the index header (avts inspect).

Conversion is parallel (--workers processes) and resumable: converted chunks are kept in a local
work folder (--work-dir; default <out>/.prepare-work for a local --out) and a rerun of an
interrupted conversion reuses them (they are deleted after success unless --keep-work).
A report of what was skipped and why is printed and saved as <out>/prepare_report.json.
"""

from __future__ import annotations

import argparse
import json
import os

from avts_dist.cli import CLIError, add_storage_options
from avts_dist.config import DataConfig

DATASETS = ("ucf101", "hmdb51", "esc50", "dcase2014", "audioset", "kinetics", "folder")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("dataset", choices=DATASETS, help="source layout")
    parser.add_argument("--src", required=True, help="the dataset's root folder on local disk")
    parser.add_argument("--out", required=True, help="output dataset URL (path, s3://...)")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    parser.add_argument("--shard-size", type=int, default=64, help="clips per tar shard")
    parser.add_argument("--chunk-size", type=int, default=16, help="clips per resumable chunk")
    parser.add_argument(
        "--short-side", type=int, default=128, help="training profile: video short side (even)"
    )
    parser.add_argument(
        "--fps", type=float, default=0.0, help="training profile: frame rate (0: source's, <= 30)"
    )
    parser.add_argument(
        "--sample-rate",
        type=int,
        default=DataConfig.sample_rate,
        help="training profile: AAC mono sample rate; match data.sample_rate",
    )
    parser.add_argument(
        "--copy", action="store_true", help="keep H.264/AAC MP4 sources untouched (no profile)"
    )
    parser.add_argument("--work-dir", default=None, help="local folder for resumable chunks")
    parser.add_argument(
        "--keep-work", action="store_true", help="keep the converted chunks after success"
    )
    parser.add_argument("--limit", type=int, default=0, help="convert only the first N items")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    add_storage_options(parser)


def run(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from avts_dist.data.converters import EncodeProfile, LayoutError, prepare

    if args.workers < 1 or args.shard_size < 1 or args.chunk_size < 1:
        raise CLIError("--workers, --shard-size and --chunk-size must be >= 1")
    try:
        profile = EncodeProfile(
            name="copy" if args.copy else "training",
            short_side=args.short_side,
            fps=args.fps,
            sample_rate=args.sample_rate,
        )
    except ValueError as exc:
        raise CLIError(f"--{str(exc).replace('_', '-')}") from None
    try:
        report = prepare(
            args.dataset,
            args.src,
            args.out,
            workers=args.workers,
            shard_size=args.shard_size,
            chunk_size=args.chunk_size,
            profile=profile,
            work_dir=args.work_dir,
            storage_options=args.storage_options,
            progress=not args.no_progress,
            limit=args.limit,
            keep_work=args.keep_work,
        )
    except LayoutError as exc:
        raise CLIError(str(exc)) from None
    if args.json:
        print(json.dumps(asdict(report), indent=1))
    else:
        print(report.summary())
    return 0
