"""avts status: how a pretraining run is doing (live or ended), from the files it writes.

    avts status runs/quickstart
    avts status s3://bucket/runs/audioset --storage-options '{"anon": false}'
    avts status runs/quickstart --json

Shows step and epoch of the total, rate, ETA, the newest complete checkpoint, the curriculum
stage, skipped clips, the data-wait fraction, the latest validation accuracies and the MLflow
run (status and UI link when the tracking store is reachable). Nothing is written; a live run
is read between its writes. Lines starting with "note:" say which figures were derived and how.
Exit status 0, or 2 when the path is not a readable run directory.
"""

from __future__ import annotations

import argparse
import json

from avts_dist.cli import CLIError, add_storage_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("run_dir", metavar="RUN_DIR|URL", help="run directory (or s3://...)")
    parser.add_argument("--json", action="store_true", help="print the status as one JSON object")
    parser.add_argument(
        "--stale-after",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="an unfinished run with no new metrics for this long is 'stopped' (default 600)",
    )
    parser.add_argument(
        "--no-dataset",
        action="store_true",
        help="do not read the dataset index (total steps then come from the config alone)",
    )
    add_storage_options(parser)


def run(args: argparse.Namespace) -> int:
    from avts_dist.status import RunStatusError, format_status, read_status

    try:
        st = read_status(
            args.run_dir,
            args.storage_options,
            stale_after_s=args.stale_after,
            read_dataset=not args.no_dataset,
        )
    except RunStatusError as exc:
        raise CLIError(str(exc)) from None
    print(json.dumps(st.to_dict(), indent=1) if args.json else format_status(st))
    return 0
