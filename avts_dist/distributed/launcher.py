"""Local ranks as child processes of one command (the launcher role of torchrun, for
``avts train --nproc N`` and the tests' hooked runs)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from avts_dist.distributed.collectives import free_port

__all__ = ["spawn_local_ranks"]


def _how(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited {code}"


# A rank that fails leaves the others waiting in a collective: they are killed after this.
_GRACE_S = 30.0


def spawn_local_ranks(cmd: list[str], nproc: int, *, ok_codes: tuple[int, ...] = (0,)) -> int:
    """Runs ``cmd`` as ``nproc`` ranks on a free loopback port; forwards SIGTERM/SIGUSR2/SIGINT.

    Returns 0 when every rank exits 0, the first code of ``ok_codes`` other than 0 that any rank
    returned (e.g. 75, preempted) when all are in ``ok_codes``, and 1 when any rank failed.
    """
    port = free_port()
    procs = []
    for rank in range(nproc):
        env = dict(os.environ)
        env.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(nproc),
            LOCAL_WORLD_SIZE=str(nproc),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        procs.append(subprocess.Popen(cmd, env=env))

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {
        sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)
    }
    codes: dict[int, int] = {}
    failed_at = None
    try:
        while len(codes) < len(procs):
            for i, p in enumerate(procs):
                if i not in codes and p.poll() is not None:
                    codes[i] = p.returncode
                    if p.returncode not in ok_codes and failed_at is None:
                        failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > _GRACE_S:
                for i, p in enumerate(procs):
                    if i not in codes:
                        p.kill()
            time.sleep(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    failed = {i: c for i, c in sorted(codes.items()) if c not in ok_codes}
    if failed:
        # Which rank and how: a rank killed by a signal after its work (an abort at interpreter
        # exit) reads differently from one that failed or was killed after the grace period.
        print(
            "avts: " + "; ".join(f"rank {i} {_how(c)}" for i, c in failed.items()),
            file=sys.stderr,
        )
        return 1
    return next((c for c in ok_codes if c != 0 and c in codes.values()), 0)
