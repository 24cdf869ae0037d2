"""avts export: Export consolidated fp32 weights from a checkpoint. (Not built yet.)"""

from __future__ import annotations

import argparse

from avts_dist.cli import not_built


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    return not_built("export")
