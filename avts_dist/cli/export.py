"""avts export: consolidated fp32 weights of each subnetwork from a training checkpoint.

    avts export --checkpoint runs/quickstart/checkpoints [--tag step_000200] --out model.pt

``--checkpoint`` is a checkpoint directory (its newest complete tag is used) or one tag
directory. ZeRO shards are gathered with DeepSpeed's zero_to_fp32
(``get_fp32_state_dict_from_zero_checkpoint``). The file (format in ``avts_dist.export.format``)
loads without DeepSpeed: ``torch.load(path, weights_only=True)``.
"""

from __future__ import annotations

import argparse

from avts_dist.cli import CLIError, add_storage_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint dir or tag dir (or s3://)")
    parser.add_argument("--tag", default="", help="tag to export (default: newest complete)")
    parser.add_argument("--out", required=True, help="output file (local path or s3://...)")
    add_storage_options(parser)


def run(args: argparse.Namespace) -> int:
    # Deferred: torch and DeepSpeed load only when exporting, not for `avts --help`.
    from avts_dist.export.consolidate import ExportFailed, export_checkpoint

    try:
        out, step = export_checkpoint(
            args.checkpoint, args.out, tag=args.tag or None, storage_options=args.storage_options
        )
    except ExportFailed as exc:
        raise CLIError(str(exc)) from None
    from avts_dist.export import model_card_path

    print(f"avts export: wrote {out} (step {step}) and {model_card_path(out)}")
    return 0
