"""avts synth: write the synthetic audio-visual corpus (H.264 + AAC MP4 clips in tar shards).

Each video shows an object appearing at audio-visual events, with a tone burst at exactly those
times, so audio-visual sync is learnable. Two label sets per clip, independent of each other:
the rhythm of the events (even, swing, gallop: what sync has to learn) and the appearance
(shape and colour, pitch and timbre; --num-classes of them). --label-set picks the one in the
index's `label` column; both are recorded. Splits: train (pretraining), val (sync validation),
test, and the labelled evaluation pool eval_train / eval_test, disjoint from the others.
--version 2 draws each clip's sound (pitch, timbre) independently of its picture and jitters
the bars so that no shift of up to 2 s lines the events up again: only time ties sound to
picture, and the appearance labels name what is on screen only. Version 1 is the default.
The same --seed gives the same bytes, on any storage. Example:

  avts synth --out data/synth --num-videos 96 --seconds 4 --fps 8 --size 32 \\
      --sample-rate 16000 --num-classes 4 --shard-size 16 --seed 0
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from avts_dist.cli import CLIError, add_storage_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--out", required=True, help="dataset URL: local path, file://, s3://, memory://"
    )
    parser.add_argument("--num-videos", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each video (s)")
    parser.add_argument("--fps", type=float, default=8.0)
    parser.add_argument("--size", type=int, default=32, help="frame width = height (px, even)")
    parser.add_argument("--sample-rate", type=int, default=16000, help="audio sample rate (Hz)")
    parser.add_argument("--num-classes", type=int, default=4)
    parser.add_argument("--shard-size", type=int, default=16, help="clips per tar shard")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--broken-fraction",
        type=float,
        default=0.0,
        help="share of clips broken on purpose (truncated, no_audio, too_short, garbage in turn)",
    )
    parser.add_argument("--val-fraction", type=float, default=0.2, help="sync validation clips")
    parser.add_argument("--test-fraction", type=float, default=0.0, help="held-out sync clips")
    parser.add_argument(
        "--eval-train-fraction",
        type=float,
        default=0.15,
        help="labelled clips to fine-tune / probe on (split eval_train, never pretrained on)",
    )
    parser.add_argument(
        "--eval-test-fraction",
        type=float,
        default=0.15,
        help="labelled clips to test on (split eval_test, never pretrained on)",
    )
    parser.add_argument(
        "--label-set",
        choices=["rhythm", "appearance"],
        default="rhythm",
        help="which labels fill the index's label column (both are recorded)",
    )
    parser.add_argument(
        "--version",
        type=int,
        choices=[1, 2],
        default=1,
        help="corpus version: 1 (sound goes with picture, 1 s bars) or 2 (only time ties them)",
    )
    parser.add_argument(
        "--num-workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="encoder processes (the output does not depend on it)",
    )
    add_storage_options(parser)


def run(args: argparse.Namespace) -> int:
    from avts_dist.data.synthetic import synthesize

    started = time.monotonic()
    try:
        idx = synthesize(
            args.out,
            num_videos=args.num_videos,
            seconds=args.seconds,
            fps=args.fps,
            size=args.size,
            sample_rate=args.sample_rate,
            num_classes=args.num_classes,
            shard_size=args.shard_size,
            seed=args.seed,
            broken_fraction=args.broken_fraction,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            eval_train_fraction=args.eval_train_fraction,
            eval_test_fraction=args.eval_test_fraction,
            label_set=args.label_set,
            version=args.version,
            storage_options=args.storage_options,
            num_workers=max(1, args.num_workers),
            progress=sys.stderr.isatty(),
        )
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    num_ok = int((idx.status == "ok").sum())
    print(
        f"wrote {len(idx)} clips ({num_ok} ok) in {len(idx.shards)} shards to {args.out} "
        f"in {time.monotonic() - started:.1f}s"
    )
    return 0
