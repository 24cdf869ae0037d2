"""Local ranks as child processes of one command (the launcher role of torchrun, for
``avts train --nproc N`` and the tests' hooked runs).

Two ways to start a rank, the same process boundary either way (its own pid, signals, exit
status, a SIGKILL that takes only it):

- ``exec``: a fresh interpreter runs the command (``subprocess.Popen``), as torchrun does. Each
  rank imports torch, DeepSpeed and the trainer itself.
- ``fork``: the launcher imports them once and forks the ranks (the command must be
  ``python -m MODULE ...``, which the child runs with ``runpy``). On the 2-core test machine a
  rank's imports were most of its CPU time in a short run (about 8 of 9 CPU-s); forked, they are
  paid once per launcher. Used on CPU only (:func:`rank_start_method`): with CUDA, a process
  that has touched the driver must not fork ranks that use it, so ranks are exec'd there.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import runpy
import signal
import subprocess
import sys
import time
import traceback

from avts_dist.distributed.collectives import free_port

__all__ = ["rank_start_method", "spawn_local_ranks"]

START_METHODS = ("exec", "fork")


def rank_start_method(env=None) -> str:
    """``fork`` on a machine without CUDA, ``exec`` with it; ``AVTS_RANK_START`` (``exec`` or
    ``fork``) overrides."""
    env = os.environ if env is None else env
    chosen = env.get("AVTS_RANK_START", "")
    if chosen:
        if chosen not in START_METHODS:
            raise ValueError(f"AVTS_RANK_START={chosen!r} is not one of {START_METHODS}")
        return chosen
    import torch

    return "exec" if torch.cuda.is_available() else "fork"


class _ForkedRank:
    """The part of ``subprocess.Popen`` the launcher uses, for a forked rank."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _run_forked_rank(module: str, args: list[str], env: dict[str, str]) -> None:
    """In the forked child: ``python -m module args`` with ``env``; never returns."""
    code = 1
    try:
        os.environ.clear()
        os.environ.update(env)
        import torch

        # OpenMP read OMP_NUM_THREADS when the launcher imported torch: set this rank's own.
        torch.set_num_threads(max(1, int(env.get("OMP_NUM_THREADS", "1"))))
        sys.argv = [module, *args]
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            if exc.code is None or isinstance(exc.code, int):
                code = exc.code or 0
            else:  # sys.exit("message"), as the interpreter reports it
                print(exc.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
        atexit._run_exitfuncs()  # a forked child leaves through os._exit: what exit would run
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def _start_rank(cmd: list[str], env: dict[str, str], start: str):
    if start == "exec":
        return subprocess.Popen(cmd, env=env)
    if len(cmd) < 3 or cmd[1] != "-m":
        raise ValueError(f"a forked rank runs `python -m MODULE ...`, not {cmd[:3]}")
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _run_forked_rank(cmd[2], cmd[3:], env)
    return _ForkedRank(pid)


def _how(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited {code}"


# A rank that fails leaves the others waiting in a collective: they are killed after this.
_GRACE_S = 30.0


def spawn_local_ranks(
    cmd: list[str], nproc: int, *, ok_codes: tuple[int, ...] = (0,), start: str = "exec"
) -> int:
    """Runs ``cmd`` as ``nproc`` ranks on a free loopback port; forwards SIGTERM/SIGUSR2/SIGINT.
    ``start``: ``exec`` or ``fork`` (see the module docstring; with ``fork`` the caller imports
    first what the ranks share, as ``avts_dist.cli.train.spawn_trainer_ranks`` does).

    Returns 0 when every rank exits 0, the first code of ``ok_codes`` other than 0 that any rank
    returned (e.g. 75, preempted) when all are in ``ok_codes``, and 1 when any rank failed.
    """
    if start not in START_METHODS:
        raise ValueError(f"start={start!r} is not one of {START_METHODS}")
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
        procs.append(_start_rank(cmd, env, start))

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
