"""avts train: pretrain with DeepSpeed.

    avts train --config configs/pretrain/quickstart.yaml [key=value ...] [--nproc N]

With ``--nproc N`` (N > 1) it starts N local ranks itself (gloo on CPU, nccl on GPU) on a free
loopback port and forwards SIGTERM/SIGUSR2/SIGINT to them. Under a launcher that sets
``RANK``/``WORLD_SIZE`` (torchrun, deepspeed, srun, submitit) it runs this one rank.
Exit status: 0 completed, 75 preempted (checkpoint saved; resume with ``resume=auto``),
1 failed (e.g. too many non-finite steps, after a checkpoint), 2 bad input.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time

from avts_dist.cli import CLIError

EXIT_PREEMPTED = 75


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML under configs/pretrain/")
    parser.add_argument("--nproc", type=int, default=1, help="local processes to start (default 1)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(args: argparse.Namespace) -> int:
    """N local ranks as child processes of this one (the launcher role of torchrun)."""
    port = _free_port()
    cmd = [sys.executable, "-m", "avts_dist", "train", "--config", args.config, *args.overrides]
    procs = []
    for rank in range(args.nproc):
        env = dict(os.environ)
        env.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(args.nproc),
            LOCAL_WORLD_SIZE=str(args.nproc),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
        procs.append(subprocess.Popen(cmd, env=env))

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT):
        signal.signal(sig, forward)
    codes: dict[int, int] = {}
    failed_at = None
    while len(codes) < len(procs):
        for i, p in enumerate(procs):
            if i not in codes and p.poll() is not None:
                codes[i] = p.returncode
                if p.returncode not in (0, EXIT_PREEMPTED) and failed_at is None:
                    failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > 30:
            # A rank died: the others would wait forever in a collective.
            for i, p in enumerate(procs):
                if i not in codes:
                    p.kill()
        time.sleep(0.2)
    bad = [c for c in codes.values() if c not in (0, EXIT_PREEMPTED)]
    if bad:
        return 1 if all(c >= 0 for c in bad) else 1
    return EXIT_PREEMPTED if EXIT_PREEMPTED in codes.values() else 0


def run(args: argparse.Namespace) -> int:
    if args.nproc < 1:
        raise CLIError("--nproc must be >= 1")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise CLIError(f"override {bad[0]!r} is not key=value")
    under_launcher = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if args.nproc > 1 and not under_launcher:
        from avts_dist.config import load_config

        load_config(args.config, args.overrides)  # bad config: one error, not N
        return _spawn(args)
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(name)s: %(message)s",
    )
    from avts_dist.distributed import collectives
    from avts_dist.train import run_training

    try:
        result = run_training(args.config, args.overrides)
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
    return {"completed": 0, "preempted": EXIT_PREEMPTED}.get(result.status, 1)
