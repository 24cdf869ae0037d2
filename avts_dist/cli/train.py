"""avts train: pretrain with DeepSpeed.

    avts train --config configs/pretrain/quickstart.yaml [key=value ...] [--nproc N]

With ``--nproc N`` (N > 1) it starts N local ranks itself (gloo on CPU, nccl on GPU) on a free
loopback port and forwards SIGTERM/SIGUSR2/SIGINT to them. Under a launcher that sets
``RANK``/``WORLD_SIZE`` (torchrun, deepspeed, submitit) or under ``srun`` it runs this one rank.
Exit status: 0 completed, 75 preempted (checkpoint saved; resume with ``resume=auto``),
1 failed (e.g. too many non-finite steps, after a checkpoint), 2 bad input.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from avts_dist.cli import CLIError
from avts_dist.config import load_config

EXIT_PREEMPTED = 75
EXIT_CODES = {"completed": 0, "preempted": EXIT_PREEMPTED}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML under configs/pretrain/")
    parser.add_argument("--nproc", type=int, default=1, help="local processes to start (default 1)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def run(args: argparse.Namespace) -> int:
    if args.nproc < 1:
        raise CLIError("--nproc must be >= 1")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise CLIError(f"override {bad[0]!r} is not key=value")
    under_launcher = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    # torch, deepspeed and the trainer are imported below, not at the top: every `avts`
    # command imports this module to build its parser, and they cost seconds.
    if args.nproc > 1 and not under_launcher:
        from avts_dist.extras import require_tracking

        # bad config or a missing package: one error, not N (the launcher never tracks: it
        # checks that mlflow is installed without importing it)
        require_tracking(load_config(args.config, args.overrides), load=False)
        cmd = [sys.executable, "-m", "avts_dist", "train", "--config", args.config]
        return spawn_trainer_ranks([*cmd, *args.overrides], args.nproc)
    return train_and_report(args.config, args.overrides)


def train_and_report(config: str, overrides: list[str], hooks=None) -> int:
    """This rank's run (``run_training``), its one-line summary on rank 0, its exit status."""
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(name)s: %(message)s",
    )
    from avts_dist.distributed import collectives
    from avts_dist.train import run_training

    try:
        result = run_training(config, overrides, hooks=hooks)
    except ValueError as exc:  # e.g. unusable dataset, mismatching checkpoint
        raise CLIError(str(exc).splitlines()[0]) from None
    finally:
        collectives.destroy()
    if rank == 0:
        print(
            f"avts train: {result.status} at step {result.step}"
            + (f", loss {result.final_loss:.4f}" if result.final_loss is not None else "")
            + f"; run dir {result.run_dir}; checkpoints {result.checkpoint_dir}"
            + (f"; mlflow run {result.mlflow_run_id}" if result.mlflow_run_id else "")
        )
        if result.message:
            print(f"avts train: {result.message}", file=sys.stderr)
    return EXIT_CODES.get(result.status, 1)


def spawn_trainer_ranks(cmd: list[str], nproc: int) -> int:
    """``cmd`` (``python -m MODULE ...``, a trainer's entry) as ``nproc`` local ranks, started the
    way :func:`~avts_dist.distributed.launcher.rank_start_method` says (forked after
    :func:`preload_trainer` on CPU); exit status as ``spawn_local_ranks``, 75 when preempted."""
    from avts_dist.distributed.launcher import rank_start_method, spawn_local_ranks

    start = rank_start_method()
    if start == "fork":
        preload_trainer()
    return spawn_local_ranks(cmd, nproc, ok_codes=(0, EXIT_PREEMPTED), start=start)


def preload_trainer() -> None:
    """What every trainer rank imports, imported by the launcher once before it forks them."""
    import torch._dynamo  # noqa: F401  (torch.optim's first optimizer imports it: ~3 CPU-s)

    import avts_dist.train.run  # noqa: F401
    from avts_dist.extras import import_deepspeed

    import_deepspeed()
