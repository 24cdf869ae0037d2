"""``make test``'s pytest in two processes side by side: the SLURM tests and the rest (issue #21).

    python -m tests.run_suite [pytest args...]      # what `make test` runs (PYTEST_ARGS appended)
    AVTS_TEST_SERIAL=1 python -m tests.run_suite    # one pytest, as before

Why: the SLURM tests keep about one core busy (they wait on the scheduler and on jobs that run
one at a time on the local cluster), while the other tests are mostly two-rank trainings that keep
both busy 72% of the time. Run one after the other, the cores were busy 55-58% of the suite's
wall time (fresh-clone runs r6-r8, docs/benchmarks.md); side by side, 84-85% (r12, r13).

Two pytest sessions rather than pytest-xdist: each part starts its own servers (moto, MLflow)
and keeps its own session fixtures; the SLURM clusters are started, used and stopped by one
process only, the SLURM part. A test is in the SLURM part when it carries the ``slurm`` mark
(every test that uses a cluster fixture gets it at collection: ``tests/fixtures/slurm.py``, which
also deselects the other part's tests by ``AVTS_TEST_PART``), or is in one of the files of
BESIDE_SLURM, which even out the two parts' times.

Each part writes its lines prefixed ``[slurm]`` or ``[rest]`` as they complete; each ends with its
own ``--durations`` and CPU report (whose per-test CPU then includes the other part's work at the
time: the whole run's busy CPU is printed last). ``AVTS_TEST_CPU_JSON=path`` becomes
``path.slurm.json`` and ``path.rest.json``. The exit status is 0 only when both parts pass (a part
that selects no test, pytest's 5, passes). pytest arguments that pick tests by mark (``-m``) or run
them elsewhere (``-n``) fall back to one serial pytest.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.fixtures.cpu_time import busy_cpu_seconds

PARTS = ("slurm", "rest")
NO_TESTS = 5  # pytest's exit status when a selection collects nothing
# Files the SLURM part runs although they need no cluster, to even out the two parts: run side by
# side at df333e6, the SLURM tests alone took 543 s and the rest 1,045 s. These three took 98,
# 44 and 59 s there, and need no session fixture the SLURM part does not build anyway.
BESIDE_SLURM = frozenset(
    {
        "tests/gpu/test_gpu_check.py",
        "tests/integration/test_tracking_train.py",
        "tests/integration/test_study.py",
        # Since test_study.py runs in-process (60 s less in the SLURM part), the SLURM part was
        # the shorter by ~200 s: test_early_fusion.py and test_video_ssl.py (~95 s, no server of
        # their own) moved beside it. On a faster machine (fresh-clone run r21: the SLURM part
        # 543 s, the rest 471; its waits on the scheduler do not shrink with the CPU) the SLURM part
        # was the longer: test_video_ssl.py (32 s there) went back to the rest.
        "tests/integration/test_early_fusion.py",
    }
)


def part_of(item) -> str:
    """The part a collected test runs in: ``slurm`` for the tests with the ``slurm`` mark (every
    test that uses a cluster has it: tests/fixtures/slurm.py) and the files of BESIDE_SLURM."""
    if item.get_closest_marker("slurm") is not None:
        return "slurm"
    return "slurm" if item.nodeid.split("::")[0] in BESIDE_SLURM else "rest"


def serial(args: list[str]) -> bool:
    if os.environ.get("AVTS_TEST_SERIAL", "0") == "1":
        return True
    return any(a in ("-m", "-n") or a.startswith(("-m=", "-n=", "--numprocesses")) for a in args)


def exit_status(codes: dict[str, int]) -> int:
    """The run's status from the parts': 0 when each passed or selected nothing and some part
    ran tests; else the first failing part's (or 5 when no part selected anything)."""
    failed = [code for code in codes.values() if code not in (0, NO_TESTS)]
    if failed:
        return failed[0]
    return NO_TESTS if all(code == NO_TESTS for code in codes.values()) else 0


def _pump(name: str, stream, lock: threading.Lock) -> None:
    """Copies a part's output line by line, prefixed, so the two never mix within a line."""
    for line in iter(stream.readline, ""):
        with lock:
            sys.stdout.write(f"[{name}] {line}")
            sys.stdout.flush()
    stream.close()


def main(args: list[str]) -> int:
    pytest = [sys.executable, "-m", "pytest", "--durations=25"]
    if serial(args):
        return subprocess.call([*pytest, "-m", "not chaos", *args])
    b0, t0 = busy_cpu_seconds(), time.monotonic()
    lock = threading.Lock()
    procs, pumps = {}, []
    for name in PARTS:
        # The part's tests are chosen at collection (tests/fixtures/slurm.py calls part_of).
        env = dict(os.environ, AVTS_TEST_PART=name)
        if "AVTS_TEST_CPU_JSON" in env:
            env["AVTS_TEST_CPU_JSON"] = f"{env['AVTS_TEST_CPU_JSON']}.{name}.json"
        # Its own base temporary folder: two sessions never share pytest-of-<user>/pytest-N.
        basetemp = Path(os.environ.get("TMPDIR", "/tmp")) / f"avts-pytest-{os.getuid()}" / name
        basetemp.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        cmd = [*pytest, "-m", "not chaos", f"--basetemp={basetemp}", *args]
        if name != "rest":
            cmd += ["-p", "no:cacheprovider"]  # one writer of .pytest_cache (the larger part)
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            stdin=subprocess.DEVNULL, bufsize=1,
        )  # fmt: skip
        procs[name] = proc
        pump = threading.Thread(target=_pump, args=(name, proc.stdout, lock), daemon=True)
        pump.start()
        pumps.append(pump)
    codes = {name: proc.wait() for name, proc in procs.items()}
    for pump in pumps:
        pump.join()
    wall = time.monotonic() - t0
    b1 = busy_cpu_seconds()
    cores = os.cpu_count() or 1
    code = exit_status(codes)
    status = "passed" if code == 0 else "FAILED"
    cpu = ""
    if b0 is not None and b1 is not None:
        busy = b1 - b0
        cpu = f", {busy:.0f} busy CPU-s on {cores} cores ({100 * busy / max(wall * cores, 1e-9):.0f}%)"
    parts = ", ".join(f"{name} part exit {code}" for name, code in codes.items())
    print(f"make test: {status} in {wall:.0f} s of pytest, two parts side by side ({parts}){cpu}")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
