"""SLURM job states and the one job waiter (``avts launch --wait`` and ``avts study``).

States come from ``scontrol show job -o`` (no accounting database is needed). A job is waited
for element by element: a plain job is one element, a job array of n elements n, each named as
SLURM names it (``<id>_<i>``). :func:`wait_for_jobs` returns when every element ended:

- an element pending on a dependency that can never be met (``DependencyNeverSatisfied``: the
  job it waits for failed) is cancelled, so that nothing waits forever;
- an element seen before and no longer reported (it ended longer than SLURM's MinJobAge ago)
  counts as ended: its last state if that was terminal, else :data:`GONE`.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable

# Terminal SLURM job states (REQUEUED/PENDING/RUNNING... are not).
TERMINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}
# An element SLURM no longer reports, whose last state seen was not terminal: it ended.
GONE = "GONE"


def job_states(job_id: str, timeout_s: float = 15.0) -> list[dict[str, str]]:
    """``scontrol show job -o`` as dicts, one per job (an array id gives one per task)."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "job", "-o", str(job_id)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        return []
    if out.returncode != 0:
        return []
    return [
        dict(tok.split("=", 1) for tok in line.split() if "=" in tok)
        for line in out.stdout.splitlines()
        if line.strip()
    ]


def job_state(job_id: str, timeout_s: float = 15.0) -> dict[str, str]:
    """The job's ``scontrol show job`` fields (JobState, Restarts, Reason, ...); {} if unknown."""
    states = job_states(job_id, timeout_s)
    return states[0] if states else {}


def combined_state(states: list[str]) -> str:
    """A job of several elements is done when every element is; it completed only if every
    element did."""
    states = states or ["UNKNOWN"]
    if not all(s in TERMINAL_STATES or s == GONE for s in states):
        return next(s for s in states if s not in TERMINAL_STATES and s != GONE)
    return next((s for s in states if s != "COMPLETED"), "COMPLETED")


def job_outcomes(jobs: dict[str, int], final: dict[str, str]) -> dict[str, str]:
    """Job id -> the combined final state of its elements (``final``: :func:`wait_for_jobs`)."""
    return {
        job_id: combined_state([final.get(element_name(job_id, i, n), "UNKNOWN") for i in range(n)])
        for job_id, n in jobs.items()
    }


def task_ids(text: str) -> list[int]:
    """SLURM's ArrayTaskId: ``3``, or for elements not started yet ``0-7%2`` / ``1,3-4``."""
    ids = []
    for part in text.split("%")[0].split(","):
        first, _, last = part.partition("-")
        if first.isdigit():
            ids += range(int(first), int(last or first) + 1)
    return ids


def element_name(job_id: str, index: int, num_elements: int) -> str:
    """How SLURM names an element: the job id for a plain job, ``<id>_<i>`` in an array."""
    return job_id if num_elements == 1 else f"{job_id}_{index}"


def element_states(job_id: str, num_elements: int) -> dict[str, dict[str, str]]:
    """Element name -> scontrol's fields, for every element of the job SLURM reports."""
    out = {}
    for info in job_states(job_id):
        if "ArrayTaskId" not in info:
            # submitit submits a batch of one as a plain job: element 0.
            if info.get("JobId") == job_id:
                out[element_name(job_id, 0, num_elements)] = info
            continue
        for task in task_ids(info["ArrayTaskId"]):
            out[element_name(job_id, task, num_elements)] = info
    return out


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cancel(element: str) -> None:
    subprocess.run(["scancel", element], check=False, capture_output=True, timeout=30)


def _poll(jobs: dict[str, int], echo: Callable[[str], None]) -> dict[str, tuple[str, str]]:
    """Element -> (state, restarts) now; a dependency that can never be met is cancelled."""
    current = {}
    for job_id, num_elements in jobs.items():
        for element, info in element_states(job_id, num_elements).items():
            state = info.get("JobState", "UNKNOWN")
            if state == "PENDING" and info.get("Reason") == "DependencyNeverSatisfied":
                cancel(element)
                echo(f"job {element}: a job it depends on failed; cancelled")
            current[element] = (state, info.get("Restarts", "0"))
    return current


def wait_for_jobs(
    jobs: dict[str, int],
    echo: Callable[[str], None] | None = None,
    poll_s: float = 2.0,
    timeout_s: float | None = None,
) -> dict[str, str]:
    """Blocks until every element of ``jobs`` (job id -> number of elements) ended, requeues
    included; element name (:func:`element_name`) -> final state. Each change of state is
    echoed. After ``timeout_s`` it returns the states as they are."""
    echo = echo or _stderr
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    expected = {element_name(j, i, n) for j, n in jobs.items() for i in range(n)}
    last: dict[str, str] = {}
    while True:
        polled = _poll(jobs, echo)
        current = {element: state for element, (state, _) in polled.items()}
        for element in set(last) - set(current):  # seen before, no longer known: it ended
            current[element] = last[element] if last[element] in TERMINAL_STATES else GONE
        for element, state in sorted(current.items()):
            if last.get(element) != state:
                restarts = polled.get(element, ("", "0"))[1]
                echo(f"job {element}: {state}" + (f" (requeued {restarts}x)" if restarts != "0" else ""))  # fmt: skip
        last = current
        ended = {e for e, s in current.items() if s in TERMINAL_STATES or s == GONE}
        if expected <= ended:
            return current
        if deadline is not None and time.monotonic() > deadline:
            return {e: current.get(e, "UNKNOWN") for e in sorted(expected)}
        time.sleep(poll_s)
