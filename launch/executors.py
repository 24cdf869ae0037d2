"""From ``cfg.launch`` to submitit executors and sbatch scripts; cluster checks (job states and
waiting: :mod:`launch.jobs`).

One source of truth: :func:`slurm_parameters` gives submitit's SLURM parameters (sbatch
names). Submission passes them to ``AutoExecutor`` as ``slurm_*``; ``--dry-run`` renders them
with submitit's own ``_make_sbatch_string``, so what is printed is what would be submitted.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit
from submitit.slurm.slurm import _make_sbatch_string

from avts_dist.config import REPO_ROOT, ConfigError, LaunchConfig

LOCAL_SLURM = REPO_ROOT / "launch" / "local_slurm.sh"

# Environment every task exports, from submitit's TorchDistributedEnvironment (shown by --dry-run).
DIST_ENV_DOC = {
    "MASTER_ADDR": "first host of $SLURM_JOB_NODELIST",
    "MASTER_PORT": "20000-32767 (below the ephemeral ports), seeded by $SLURM_JOB_ID",
    "RANK": "$SLURM_PROCID",
    "LOCAL_RANK": "$SLURM_LOCALID",
}


class LaunchError(ConfigError):
    """A cluster option the cluster cannot honour (named), raised before anything is submitted."""


# ---------------------------------------------------------------------------------------------
# Times


def parse_slurm_time(text: str) -> float | None:
    """SLURM time syntax to minutes; None for UNLIMITED/INFINITE.

    Accepts ``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M``, ``D-H:M:S``.
    """
    text = text.strip()
    if text.upper() in ("UNLIMITED", "INFINITE", "NONE"):
        return None
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not m:
        raise LaunchError(f"launch.time: {text!r} is not a SLURM time (HH:MM:SS or D-HH:MM:SS)")
    days, a, b, c = m.groups()
    nums = [int(x) for x in (a, b, c) if x is not None]
    if days is not None:
        h, mi, s = (nums + [0, 0])[:3]
        return int(days) * 1440 + h * 60 + mi + s / 60
    if len(nums) == 1:
        return float(nums[0])
    if len(nums) == 2:
        return nums[0] + nums[1] / 60
    return nums[0] * 60 + nums[1] + nums[2] / 60


def time_minutes(text: str) -> int:
    """Whole minutes for sbatch --time (rounded up), refusing a zero time limit."""
    minutes = parse_slurm_time(text)
    if minutes is None:
        raise LaunchError("launch.time: a job needs a finite time limit")
    if minutes <= 0:
        raise LaunchError(f"launch.time: {text!r} is an impossible time limit (zero)")
    return math.ceil(minutes)


def tasks_per_node(launch: LaunchConfig) -> int:
    """One task per GPU unless set; a CPU partition (no GPU) defaults to one task per node."""
    return launch.tasks_per_node or launch.gpus_per_node or 1


def check_options(launch: LaunchConfig) -> None:
    """Checks that need no cluster."""
    minutes = time_minutes(launch.time)
    if launch.grace_s <= 0:
        raise LaunchError("launch.grace_s: must be > 0 (seconds between the signal and the kill)")
    if launch.grace_s >= minutes * 60:
        raise LaunchError(
            f"launch.grace_s: {launch.grace_s}s leaves no run time in a {launch.time} time limit"
        )
    if launch.gpus_per_node and launch.tasks_per_node not in (0, launch.gpus_per_node):
        raise LaunchError(
            f"launch.tasks_per_node: {launch.tasks_per_node} tasks for {launch.gpus_per_node} GPUs "
            "per node; training runs one task per GPU"
        )


# ---------------------------------------------------------------------------------------------
# The cluster


@dataclass
class Partition:
    name: str
    max_time_min: float | None
    total_nodes: int
    total_cpus: int
    state: str
    default: bool
    has_gpus: bool
    raw: dict[str, str] = field(default_factory=dict)


def slurm_available() -> bool:
    return shutil.which("sbatch") is not None and shutil.which("scontrol") is not None


def use_local_slurm_conf() -> None:
    """Points SLURM clients at the local cluster's config when the machine has none of its own."""
    local_conf = Path(os.environ.get("AVTS_SLURM_DIR", "/tmp/avts-slurm")) / "slurm.conf"
    no_system_conf = not Path("/etc/slurm/slurm.conf").exists()
    if "SLURM_CONF" not in os.environ and local_conf.exists() and no_system_conf:
        os.environ["SLURM_CONF"] = str(local_conf)


def local_cluster(action: str) -> int:
    """``launch/local_slurm.sh ACTION`` (up, down, status, mn-up, ...); its exit status."""
    if os.geteuid() != 0 and not action.endswith("status"):
        raise LaunchError(
            "the local SLURM cluster needs root (it installs packages, starts daemons)"
        )
    return subprocess.run(["bash", str(LOCAL_SLURM), action], check=False).returncode


def query_partitions(timeout_s: float = 15.0) -> dict[str, Partition]:
    """The cluster's partitions from ``scontrol show partition -o``; LaunchError if unreachable."""
    if not slurm_available():
        raise LaunchError(
            "no SLURM client found (sbatch/scontrol); start the local cluster with "
            "`avts launch cluster up`, or use --dry-run or --cluster local"
        )
    try:
        out = subprocess.run(
            ["scontrol", "show", "partition", "-o"],
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        raise LaunchError("SLURM controller did not answer `scontrol show partition`") from None
    if out.returncode != 0:
        msg = (out.stderr or out.stdout).strip().splitlines()
        raise LaunchError(
            f"SLURM controller unreachable ({msg[-1] if msg else 'scontrol failed'}); start the "
            "local cluster with `avts launch cluster up`, or use --dry-run"
        )
    parts: dict[str, Partition] = {}
    for line in out.stdout.splitlines():
        kv = dict(tok.split("=", 1) for tok in line.split() if "=" in tok)
        if "PartitionName" not in kv:
            continue
        tres = kv.get("TRES", "")
        parts[kv["PartitionName"]] = Partition(
            name=kv["PartitionName"],
            max_time_min=parse_slurm_time(kv.get("MaxTime", "UNLIMITED")),
            total_nodes=int(kv.get("TotalNodes", "0") or 0),
            total_cpus=int(kv.get("TotalCPUs", "0") or 0),
            state=kv.get("State", "UP"),
            default=kv.get("Default", "NO") == "YES",
            has_gpus="gres/gpu" in tres,
            raw=kv,
        )
    return parts


def check_against_cluster(launch: LaunchConfig, parts: dict[str, Partition]) -> Partition:
    """Unknown partition, time over MaxTime, too many nodes/CPUs, GPUs on a CPU partition."""
    if not parts:
        raise LaunchError("the SLURM cluster has no partition")
    if launch.partition:
        if launch.partition not in parts:
            raise LaunchError(
                f"launch.partition: unknown partition {launch.partition!r}; this cluster has "
                f"{', '.join(sorted(parts))}"
            )
        part = parts[launch.partition]
    else:
        defaults = [p for p in parts.values() if p.default]
        if not defaults:
            raise LaunchError(
                f"launch.partition: the cluster has no default partition; pick one of "
                f"{', '.join(sorted(parts))}"
            )
        part = defaults[0]
    if part.state != "UP":
        raise LaunchError(f"launch.partition: partition {part.name!r} is {part.state}")
    minutes = time_minutes(launch.time)
    if part.max_time_min is not None and minutes > part.max_time_min:
        raise LaunchError(
            f"launch.time: {launch.time} exceeds partition {part.name!r}'s MaxTime "
            f"{part.raw.get('MaxTime')}"
        )
    if part.total_nodes and launch.nodes > part.total_nodes:
        raise LaunchError(
            f"launch.nodes: {launch.nodes} nodes requested, partition {part.name!r} has "
            f"{part.total_nodes}"
        )
    if launch.gpus_per_node and not part.has_gpus:
        raise LaunchError(
            f"launch.gpus_per_node: partition {part.name!r} has no GPUs; for a CPU partition use "
            "--gpus-per-node 0 --tasks-per-node K"
        )
    cpus_task = launch.cpus_per_task or 1
    cpus = launch.nodes * tasks_per_node(launch) * cpus_task
    if part.total_cpus and cpus > part.total_cpus:
        raise LaunchError(
            f"launch.cpus_per_task: {cpus} CPUs requested "
            f"({launch.nodes} nodes x {tasks_per_node(launch)} tasks x {cpus_task}), "
            f"partition {part.name!r} has {part.total_cpus}"
        )
    return part


def gres_gpus(gres: str) -> int:
    """GPUs of one node from sinfo's ``%G``: ``gpu:8``, ``gpu:a100:4(S:0-1)``,
    ``gpu:2,shard:8``; 0 for ``(null)``."""
    total = 0
    for item in gres.split(","):
        fields = re.sub(r"\(.*?\)", "", item).split(":")
        if fields[0] == "gpu" and len(fields) >= 2 and fields[-1].isdigit():
            total += int(fields[-1])
    return total


# Partition -> (CPUs, GPUs) of each of its node shapes; "" -> the default partition's shapes.
NodeShapes = dict[str, list[tuple[int, int]]]


def parse_sinfo_cpus_gpus(text: str) -> NodeShapes:
    """``sinfo -h -o '%P|%c|%G'`` (the default partition marked ``*``) to :data:`NodeShapes`."""
    out: NodeShapes = {}
    for line in text.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 3 or not fields[1].strip().isdigit():
            continue
        name = fields[0].strip()
        shape = (int(fields[1]), gres_gpus(fields[2].strip()))
        out.setdefault(name.rstrip("*"), []).append(shape)
        if name.endswith("*"):
            out.setdefault("", []).append(shape)
    return out


def cpus_per_gpu(shapes: list[tuple[int, int]]) -> int | None:
    """CPUs per GPU a job can count on in a partition: the smallest over its GPU node shapes."""
    ratios = [cpus // gpus for cpus, gpus in shapes if gpus > 0]
    return max(1, min(ratios)) if ratios else None


def query_cpus_gpus(timeout_s: float = 15.0) -> NodeShapes:
    """Every partition's node shapes from ``sinfo``; LaunchError when it does not answer."""
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-o", "%P|%c|%G"], capture_output=True, text=True, timeout=timeout_s
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LaunchError(f"sinfo did not answer ({exc})") from None
    if out.returncode != 0:
        msg = (out.stderr or out.stdout).strip().splitlines()
        raise LaunchError(f"sinfo failed ({msg[-1] if msg else out.returncode})")
    return parse_sinfo_cpus_gpus(out.stdout)


def settle_cpus_per_task(
    launch: LaunchConfig,
    num_workers: int | None = None,
    shapes: NodeShapes | None = None,
) -> tuple[str, str]:
    """Sets ``launch.cpus_per_task`` when it is 0 (auto): with GPUs, the partition's CPUs per
    GPU as sinfo reports them (``shapes``: a parsed sinfo, queried when None), else 1.

    Returns (what was chosen and why, a warning or ""): the warning when ``num_workers`` data
    loader workers per rank exceed the CPUs of a task (they would share CPUs with the trainer).
    """
    if launch.cpus_per_task:
        note = f"{launch.cpus_per_task} (launch.cpus_per_task)"
    elif launch.cluster != "slurm" or not launch.gpus_per_node:
        launch.cpus_per_task = 1
        note = "1 (no GPUs per node: SLURM's default)"
    else:
        launch.cpus_per_task = 1
        note = "1 (sinfo gave no CPUs per GPU)"
        try:
            shapes = query_cpus_gpus() if shapes is None else shapes
        except LaunchError as exc:
            shapes, note = {}, f"1 (CPUs per GPU unknown: {exc})"
        per_gpu = cpus_per_gpu(shapes.get(launch.partition, []))
        if per_gpu:
            launch.cpus_per_task = per_gpu
            part = repr(launch.partition) if launch.partition else "the default partition"
            note = f"{per_gpu} (CPUs per GPU of {part} as sinfo reports them)"
    warning = ""
    if num_workers is not None and num_workers > launch.cpus_per_task:
        warning = (
            f"data.num_workers={num_workers} exceeds launch.cpus_per_task="
            f"{launch.cpus_per_task}: the loader's workers share CPUs with the trainer (set "
            "--cpus-per-task or lower data.num_workers)"
        )
    return note, warning


def check_cluster(launch: LaunchConfig, dry_run: bool) -> str:
    """Every check before anything is submitted; returns what was checked, in words.

    A dry run needs no cluster: when none is reachable, or the reachable one would refuse the
    job, it says so (``REFUSED ...``) instead of failing, so the script is still shown.
    """
    check_options(launch)
    if launch.cluster != "slurm":
        return f"cluster={launch.cluster}: no SLURM checks"
    if dry_run:
        if not slurm_available():
            return "no SLURM cluster reachable: partition/time checked only by syntax"
        try:
            parts = query_partitions()
        except LaunchError as exc:
            return f"not checked against a cluster ({exc})"
        try:
            part = check_against_cluster(launch, parts)
        except LaunchError as exc:
            return f"REFUSED by the reachable cluster: {exc}"
    else:
        part = check_against_cluster(launch, query_partitions())
    return f"checked against partition {part.name!r} (MaxTime {part.raw.get('MaxTime')})"


# ---------------------------------------------------------------------------------------------
# Executors and scripts


def slurm_parameters(
    launch: LaunchConfig, job_name: str, *, dependency: str | None = None
) -> dict[str, Any]:
    """submitit's SlurmExecutor parameters (sbatch names) for this launch config."""
    sig = launch.signal
    cpus = launch.cpus_per_task or 1  # 0 (auto) is settled by the plan
    params: dict[str, Any] = {
        "job_name": job_name,
        "time": time_minutes(launch.time),
        "nodes": launch.nodes,
        "ntasks_per_node": tasks_per_node(launch),
        "cpus_per_task": cpus,
        "signal_delay_s": launch.grace_s,
        # Every rank must see a failure of any other rank at once, not at a collective's timeout.
        # SLURM 22.05-23.02's srun does not take --cpus-per-task from the allocation: without it
        # on the srun line (and SRUN_CPUS_PER_TASK for any srun of the setup) a bound task gets
        # one CPU, shared by the trainer and all its loader workers.
        "srun_args": ["--kill-on-bad-exit=1", f"--cpus-per-task={cpus}"],
        "setup": [
            # submitit's handler and ours in the job must agree on the signal SLURM sends.
            f"export SUBMITIT_PREEMPT_SIGNAL={sig}",
            f"export AVTS_PREEMPT_SIGNAL={sig}",
            f"export SRUN_CPUS_PER_TASK={cpus}",
            # The interface gloo and NCCL bind (else maybe a management or loopback address).
            *(
                f"export {var}={shlex.quote(launch.network_interface)}"
                for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
                if launch.network_interface
            ),
            *launch.setup,
        ],
        # submitit hardcodes USR2 from the *submitting* process's env; the configured one wins.
        "additional_parameters": {"signal": f"{sig}@{launch.grace_s}"},
    }
    if launch.gpus_per_node:
        params["gpus_per_node"] = launch.gpus_per_node
    if launch.partition:
        params["partition"] = launch.partition
    for key in ("account", "qos", "constraint"):
        if getattr(launch, key):
            params[key] = getattr(launch, key)
    if launch.mem:
        # submitit converts its own `mem` as gigabytes; SLURM's syntax (64G, 500M, 0) passes as is.
        params["additional_parameters"]["mem"] = launch.mem
    if launch.exclusive:
        params["exclusive"] = True
    if dependency:
        params["dependency"] = dependency
    return params


def submitit_command(folder: str | Path, python: str | None = None) -> str:
    """The command submitit puts in the sbatch script."""
    python = python or shlex.quote(sys.executable)
    return f"{python} -u -m submitit.core._submit {shlex.quote(str(folder))}"


def render_sbatch(params: dict[str, Any], folder: str | Path) -> str:
    """The sbatch script submitit would write, without a cluster."""
    return _make_sbatch_string(command=submitit_command(folder), folder=folder, **params)


def make_executor(
    launch: LaunchConfig,
    folder: str | Path,
    job_name: str,
    *,
    dependency: str | None = None,
    max_requeues: int | None = None,
):
    """A submitit AutoExecutor for launch.cluster (slurm | local | debug)."""
    max_timeout = launch.max_requeues if max_requeues is None else max_requeues
    if launch.cluster == "slurm":
        ex = submitit.AutoExecutor(
            folder=folder, cluster="slurm", slurm_max_num_timeout=max_timeout
        )
        params = slurm_parameters(launch, job_name, dependency=dependency)
        ex.update_parameters(**{f"slurm_{k}": v for k, v in params.items()})
        return ex
    if dependency:
        raise LaunchError("job dependencies (--after, --eval-suite chaining) need --cluster slurm")
    ex = submitit.AutoExecutor(folder=folder, cluster=launch.cluster)
    ex.update_parameters(
        name=job_name,
        timeout_min=time_minutes(launch.time),
        nodes=1,
        tasks_per_node=launch.nodes * tasks_per_node(launch),
    )
    return ex


def dist_env_summary(launch: LaunchConfig) -> dict[str, str]:
    """What every task of the job exports for torch.distributed (for --dry-run)."""
    tpn = tasks_per_node(launch)
    env = dict(DIST_ENV_DOC)
    env["WORLD_SIZE"] = str(launch.nodes * tpn)
    env["LOCAL_WORLD_SIZE"] = str(tpn)
    if launch.gpus_per_node:
        env["CUDA_VISIBLE_DEVICES"] = "as SLURM sets it; the task's GPU is LOCAL_RANK's"
        env["backend"] = "cpu:gloo,cuda:nccl"
    else:
        env["backend"] = "gloo"
    env["AVTS_PREEMPT_SIGNAL"] = f"{launch.signal} ({launch.grace_s}s before the time limit)"
    return env
