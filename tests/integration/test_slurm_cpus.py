"""Every task gets the CPUs it asked for, on the local SLURM cluster with binding on
(``TaskPlugin=task/affinity``, launch/local_slurm.sh): each task's CPU set, as
``os.sched_getaffinity`` sees it, matches its ``--cpus-per-task``; and a rank of the real
trainer says what it sees in its first log line, and warns when it sees fewer than asked."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

from avts_dist.config import REPO_ROOT

pytestmark = pytest.mark.slurm

PRINT_CPUS = "import os; print(os.environ['SLURM_PROCID'], sorted(os.sched_getaffinity(0)))"


def _srun(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["srun", "--quiet", "--time=2", *args], env=env or os.environ.copy(),
                          capture_output=True, text=True, timeout=180)  # fmt: skip


def _cpu_sets(proc: subprocess.CompletedProcess) -> dict[int, list[int]]:
    assert proc.returncode == 0, proc.stderr[-2000:]
    sets = {}
    for line in proc.stdout.splitlines():
        rank, cpus = line.split(" ", 1)
        sets[int(rank)] = ast.literal_eval(cpus)
    return sets


def test_the_cluster_binds_tasks(slurm_cluster):
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True)
    plugin = next(ln for ln in config.stdout.splitlines() if ln.startswith("TaskPlugin "))
    assert plugin.split("=", 1)[1].strip() == "task/affinity", (
        f"{plugin}: a cluster started with an older launch/local_slurm.sh is running; "
        "restart it (avts launch cluster down; avts launch cluster up)"
    )


@pytest.mark.parametrize(("tasks", "cpus"), [(1, 2), (2, 1)])
def test_each_task_gets_the_cpus_it_asked_for(slurm_cluster, tasks, cpus):
    sets = _cpu_sets(_srun(f"--ntasks={tasks}", f"--cpus-per-task={cpus}", sys.executable, "-c",
                           PRINT_CPUS))  # fmt: skip
    assert sorted(sets) == list(range(tasks))
    assert all(len(s) == cpus for s in sets.values()), sets
    # Bound, not shared: the tasks' CPU sets do not overlap.
    assert len({c for s in sets.values() for c in s}) == tasks * cpus, sets


def test_a_rank_says_what_it_sees_and_warns_when_short(slurm_cluster, tmp_path, synth_corpus):
    """One task asks for 2 CPUs but the step is given 1 (what srun without --cpus-per-task does
    on SLURM 22.05-23.02): the trainer's rank says so before anything else of its own."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    env.pop("SLURM_CPUS_PER_TASK", None)
    script = tmp_path / "rank.sh"
    # Inside the step, SLURM_CPUS_PER_TASK=2 is what the job asked for; the step has 1 CPU.
    script.write_text(
        "#!/bin/bash\nexport SLURM_CPUS_PER_TASK=2\n"
        f"exec {sys.executable} -m avts_dist train --config "
        f"{REPO_ROOT / 'configs/pretrain/quickstart.yaml'} run.dir={tmp_path / 'run'} "
        f"data.url={synth_corpus} data.num_workers=1 data.global_batch_size=2 train.max_steps=1 "
        "train.val_every_steps=0 train.progress=false tracking.enabled=false "
        "checkpoint.every_steps=0\n"
    )
    script.chmod(0o755)
    proc = _srun("--ntasks=1", "--cpus-per-task=1", str(script), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = [ln for ln in proc.stderr.splitlines() if "avts." in ln]
    assert (
        "avts.host: rank 0: 1 CPUs (sched_getaffinity) of 2 asked per task, 1 loader workers"
        in ours[0]
    ), ours[:3]
    assert any("rank 0 sees 1 CPUs but the job asked for 2 per task" in ln for ln in ours), ours
