"""The single ``avts`` entry point. Each subcommand lives in its own module of this package,
which defines ``add_arguments(parser)`` and ``run(args) -> int``."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from avts_dist import __version__
from avts_dist.config import ConfigError
from avts_dist.extras import MissingPackageError
from avts_dist.storage import StorageError

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("avts_dist.cli.synth", "write the synthetic audio-visual corpus"),
    "prepare": ("avts_dist.cli.prepare", "convert a real dataset layout into shards"),
    "inspect": ("avts_dist.cli.inspect", "summarize a sharded dataset"),
    "train": ("avts_dist.cli.train", "pretrain with DeepSpeed"),
    "eval": ("avts_dist.cli.eval", "run an evaluation job"),
    "export": ("avts_dist.cli.export", "export consolidated fp32 weights from a checkpoint"),
    "compare": ("avts_dist.cli.compare", "compare MLflow runs side by side"),
    "launch": ("avts_dist.cli.launch", "submit jobs to SLURM through submitit"),
    "study": ("avts_dist.cli.study", "run a study: arms x seeds, evaluations, one MLflow group"),
    "status": ("avts_dist.cli.status", "how a pretraining run is doing (step, ETA, checkpoint)"),
    "sync-tracking": (
        "avts_dist.cli.sync_tracking",
        "send a run's undelivered MLflow records (after a tracking-server outage)",
    ),
}


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def storage_options_arg(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"--storage-options is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("--storage-options must be a JSON object")
    return value


def add_storage_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage-options",
        type=storage_options_arg,
        default={},
        metavar="JSON",
        help="fsspec options as JSON, merged over AWS_* environment settings "
        '(e.g. \'{"anon": false, "client_kwargs": {"endpoint_url": "http://..."}}\')',
    )


def accept_trailing_overrides(parser: argparse.ArgumentParser) -> None:
    """Lets ``key=value`` overrides follow options: argparse takes all positionals in one run, so
    ``job --checkpoint X k=v`` would reject ``k=v``; such stray words join ``args.overrides``."""
    parse = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        ns, extras = parse(args, namespace)
        moved = [x for x in extras if "=" in x and not x.startswith("-")]
        ns.overrides = [*(getattr(ns, "overrides", None) or []), *moved]
        return ns, [x for x in extras if x not in moved]

    parser.parse_known_args = parse_known_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="avts", description="Audio-visual temporal synchronization pretraining."
    )
    parser.add_argument("--version", action="version", version=f"avts_dist {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")
    sub.required = True
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=module.__doc__)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (CLIError, ConfigError, StorageError, MissingPackageError) as exc:
        print(f"avts {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
