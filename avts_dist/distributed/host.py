"""What a rank gets from its host, checked at start: open files for the process groups' sockets
and the CPUs SLURM bound it to. A cluster's traps (a 1024 ``ulimit -n`` at 512 ranks, srun
pinning a task to one CPU) become one log line at start instead of a hang or a slow run."""

from __future__ import annotations

import logging
import os
import resource

__all__ = ["log_cpus", "raise_open_files_limit", "sockets_needed"]

# A rank's own log line: shown on every rank (the "avts" logger is WARNING on ranks > 0; a
# child with its own level still reaches the root handler).
log = logging.getLogger("avts.host")
log.setLevel(logging.INFO)

# gloo opens a full mesh per process group: ours and DeepSpeed's clone of it.
NUM_GLOO_GROUPS = 2
# Files besides the meshes: loader worker pipes, shards, checkpoint files, the store, libraries.
OTHER_FILES = 512


def sockets_needed(world_size: int) -> int:
    """Open files one rank needs: a socket to each other rank per gloo group, plus the rest."""
    return NUM_GLOO_GROUPS * max(0, world_size - 1) + OTHER_FILES


def _world_size_from_env() -> int:
    for key in ("WORLD_SIZE", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 1


def raise_open_files_limit(world_size: int | None = None) -> tuple[int, int]:
    """Raises the soft RLIMIT_NOFILE to the hard limit (before the process groups open their
    sockets); warns in one line when the hard limit is below what ``world_size`` needs.
    Returns the (soft, hard) limits now in force."""
    world_size = world_size or _world_size_from_env()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:  # a hard limit above the kernel's nr_open
            log.warning("could not raise the open-files limit from %d to %d: %s", soft, hard, exc)
    need = sockets_needed(world_size)
    if hard != resource.RLIM_INFINITY and hard < need:
        log.warning(
            "open-files hard limit %d is below the %d a rank of %d needs (gloo's full mesh per "
            "group, %d groups): raise it (ulimit -Hn, or the cluster's limits.conf / "
            "PropagateResourceLimits)", hard, need, world_size, NUM_GLOO_GROUPS,
        )  # fmt: skip
    return soft, hard


def log_cpus(rank: int, num_workers: int) -> int:
    """Says how many CPUs this rank may run on and how many loader workers it starts; warns when
    SLURM gave it fewer CPUs than the job asked per task (srun not told ``--cpus-per-task``)."""
    num_cpus = len(os.sched_getaffinity(0))
    asked = os.environ.get("SLURM_CPUS_PER_TASK", "")
    log.info(
        "rank %d: %d CPUs (sched_getaffinity)%s, %d loader workers", rank, num_cpus,
        f" of {asked} asked per task" if asked else "", num_workers,
    )  # fmt: skip
    if asked.isdigit() and num_cpus < int(asked):
        log.warning(
            "rank %d sees %d CPUs but the job asked for %s per task: the trainer and its %d "
            "loader workers share them (srun needs --cpus-per-task or SRUN_CPUS_PER_TASK)",
            rank, num_cpus, asked, num_workers,
        )  # fmt: skip
    return num_cpus
