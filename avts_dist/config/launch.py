"""``launch``: SLURM (or local) jobs through submitit."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from avts_dist.config.common import fail

__all__ = ["LaunchConfig", "SlurmSignal"]

SlurmSignal = Literal["USR2", "USR1", "TERM", "INT", "HUP"]


@dataclass
class LaunchConfig:
    # slurm | local (submitit's local executor, K processes here) | debug (in-process)
    cluster: Literal["slurm", "local", "debug"] = "slurm"
    profile: str = ""
    nodes: int = 1
    gpus_per_node: int = 0
    # 0 means: equal to gpus_per_node (one task per GPU).
    tasks_per_node: int = 0
    partition: str = ""
    time: str = "01:00:00"
    account: str = ""
    qos: str = ""
    constraint: str = ""
    mem: str = ""
    # 0 = auto: with GPUs, the partition's CPUs per GPU as sinfo reports them (else 1).
    cpus_per_task: int = 0
    exclusive: bool = False
    # Sent to every task grace_s before the time limit (and on preemption); the trainer saves.
    signal: SlurmSignal = "USR2"
    grace_s: int = 120
    max_requeues: int = 3
    # submitit's job folder (sbatch script, pickles, per-rank logs); empty: <run.dir>/slurm.
    folder: str = ""
    # Shell lines run in the sbatch script before srun (module load, conda activate, ...).
    setup: list[str] = field(default_factory=list)
    # The network interface the process groups bind (exported as GLOO_SOCKET_IFNAME and
    # NCCL_SOCKET_IFNAME); empty: gloo's and NCCL's own choice.
    network_interface: str = ""

    def __post_init__(self) -> None:
        if self.nodes < 1:
            fail("launch.nodes", "must be >= 1")
        if self.gpus_per_node < 0 or self.tasks_per_node < 0:
            fail("launch.tasks_per_node", "gpus_per_node and tasks_per_node must be >= 0")
        if self.cpus_per_task < 0:
            fail("launch.cpus_per_task", "must be >= 1, or 0 (auto: CPUs per GPU from sinfo)")
        if self.max_requeues < 0:
            fail("launch.max_requeues", "must be >= 0")
        if not re.fullmatch(r"(\d+-)?\d{1,2}:\d{2}:\d{2}|\d+", self.time):
            fail("launch.time", f"must be HH:MM:SS, D-HH:MM:SS or minutes, got {self.time!r}")
