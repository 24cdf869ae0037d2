"""The job plan of one ``avts launch`` command, built once and then either printed (``--dry-run``)
or submitted, so what is printed is what would be submitted.

A plan is a list of jobs in submission order: pretraining, then (``--eval-suite``) the export
after it and one job or job array per evaluation after the export, chained with ``afterok``.
``avts launch eval`` plans the evaluations alone, optionally after an outside job (``--after``).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from avts_dist.config import (
    Config,
    LaunchConfig,
    config_to_yaml,
    redacted_config_dict,
    secrets_in_environment,
)
from avts_dist.storage import is_remote
from eval.registry import EvalError, parse_suite
from launch import executors
from launch.evaljobs import EvalJob, ExportJob, eval_jobs_for
from launch.executors import LaunchError
from launch.jobs import job_outcomes, job_state, wait_for_jobs
from launch.pretrain import DEFAULT_TRAINER, PretrainJob

__all__ = [
    "JobPlan",
    "PlannedJob",
    "SubmittedPlan",
    "eval_plan",
    "pretrain_plan",
    "render",
    "submit",
    "wait",
]


@dataclass
class PlannedJob:
    key: str  # "pretrain", "export", "eval-<name>": what other jobs of the plan refer to
    job_name: str  # the SLURM job name
    launch: LaunchConfig
    # One callable, or one per array task.
    tasks: list[Callable[[], Any]]
    # afterok on: the key of an earlier job of this plan, or the id of a job outside it.
    after: str | None = None
    # None: launch.max_requeues (pretraining); evaluations and the export are not requeued.
    max_requeues: int | None = None
    # The tasks form one torch.distributed job (the dry run shows their environment).
    distributed: bool = False


@dataclass
class JobPlan:
    jobs: list[PlannedJob]
    folder: str
    cluster_check: str
    # What the dry run prints last: the resolved pretraining config, if any.
    config: Config | None = None
    run_dir: str = ""
    # How launch.cpus_per_task was chosen (the dry run shows it) and warnings for the user.
    cpus_note: str = ""
    warnings: list[str] = field(default_factory=list)

    def dependency(self, job: PlannedJob, ids: dict[str, str]) -> str | None:
        """``afterok:<id>`` of the job's predecessor; a placeholder before it is submitted."""
        if job.after is None:
            return None
        if job.after in {j.key for j in self.jobs}:
            return f"afterok:{ids.get(job.after, f'<{job.after} job id>')}"
        return f"afterok:{job.after}"


@dataclass
class SubmittedPlan:
    plan: JobPlan
    # key -> SLURM job id (an array's parent id), and the submitit handles of each job.
    ids: dict[str, str]
    handles: dict[str, list[Any]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"folder": self.plan.folder}
        if self.plan.run_dir:
            out["run_dir"] = self.plan.run_dir
        for key, job_id in self.ids.items():
            if key.startswith("eval-"):
                out.setdefault("evals", {})[key.removeprefix("eval-")] = job_id
            else:
                out[key] = job_id
        if "pretrain" in self.ids:
            out["logs"] = str(Path(self.plan.folder) / f"{self.ids['pretrain']}_<rank>_log.out")
        return out


def _absolute(path: str) -> str:
    if not path or is_remote(path):
        return path
    return str(Path(path.removeprefix("file://")).resolve())


def _suite(text: str | list[str], flag: str) -> list[str]:
    try:
        return parse_suite(text)
    except EvalError as exc:
        raise LaunchError(f"{flag}: {exc}") from None


def eval_launch_config(launch: LaunchConfig, time: str | None = None) -> LaunchConfig:
    """Evaluation and export jobs: one task, at most one GPU, same partition/account."""
    return dataclasses.replace(
        launch,
        nodes=1,
        tasks_per_node=1,
        gpus_per_node=min(launch.gpus_per_node, 1),
        time=time or launch.time,
        exclusive=False,
        max_requeues=0,
    )


def _eval_jobs(
    jobs: dict[str, list[EvalJob]], launch: LaunchConfig, prefix: str, after: str | None
) -> list[PlannedJob]:
    return [
        PlannedJob(f"eval-{name}", f"{prefix}eval-{name}", launch, list(tasks), after, 0)
        for name, tasks in jobs.items()
    ]


def pretrain_plan(
    cfg: Config,
    *,
    eval_suite: str = "",
    eval_time: str | None = None,
    trainer: str = DEFAULT_TRAINER,
    dry_run: bool = False,
) -> JobPlan:
    """Pretraining (+ export and evaluations after it); raises LaunchError before anything is
    submitted or written when the cluster options cannot work."""
    cfg = copy.deepcopy(cfg)  # the plan owns its config: the caller's is left as it was
    cfg.run.dir = _absolute(cfg.run.dir)
    cfg.checkpoint.dir = _absolute(cfg.checkpoint.dir)
    if cfg.resume == "none":
        # A job SLURM restarts by itself (node failure, requeue) must continue, not start over.
        cfg.resume = "auto"
    suite = _suite(eval_suite, "--eval-suite") if eval_suite else []
    cpus_note, cpus_warning = executors.settle_cpus_per_task(cfg.launch, cfg.data.num_workers)
    cpus_note += f"; data.num_workers: {cfg.data.num_workers} per rank"
    note = executors.check_cluster(cfg.launch, dry_run)
    eval_launch = eval_launch_config(cfg.launch, eval_time)
    if suite:
        executors.check_options(eval_launch)
        if cfg.launch.cluster != "slurm":
            raise LaunchError(
                "--eval-suite chains jobs with SLURM dependencies: needs --cluster slurm"
            )
    cfg.launch.folder = _absolute(cfg.launch.folder or str(Path(cfg.run.dir) / "slurm"))
    # The job folder gets the redacted config; credentials reach the jobs through their
    # environment while they are submitted (see submit()).
    pretrain = PretrainJob(
        redacted_config_dict(cfg), trainer=trainer, max_requeues=cfg.launch.max_requeues
    )
    jobs = [PlannedJob("pretrain", cfg.run.name, cfg.launch, [pretrain], distributed=True)]
    if suite:
        export_path = str(Path(cfg.run.dir) / "export" / "model.pt")
        export = ExportJob(checkpoint=cfg.checkpoint.dir, out=export_path)
        jobs.append(
            PlannedJob("export", f"{cfg.run.name}-export", eval_launch, [export], "pretrain", 0)
        )
        evals = eval_jobs_for(
            suite,
            export_path,
            splits=list(cfg.eval.splits),
            overrides=[],
            config=str(Path(cfg.run.dir) / "config.yaml"),
            parent_run_dir=cfg.run.dir,
        )
        jobs += _eval_jobs(evals, eval_launch, f"{cfg.run.name}-", "export")
    return JobPlan(
        jobs, cfg.launch.folder, note, config=cfg, run_dir=cfg.run.dir, cpus_note=cpus_note,
        warnings=[cpus_warning] if cpus_warning else [],
    )  # fmt: skip


def eval_plan(
    cfg: Config,
    checkpoint: str,
    suite: str,
    *,
    after: str | None = None,
    config: str = "",
    overrides: list[str] | None = None,
    parent_run_id: str = "",
    parent_run_dir: str = "",
    dry_run: bool = False,
) -> JobPlan:
    """Evaluations of an exported model; ``cfg`` gives the cluster options and ``eval.splits``
    (the job arrays), ``config``/``overrides`` are what each evaluation loads."""
    names = _suite(suite, "--suite")
    launch = eval_launch_config(cfg.launch)
    cpus_note, _ = executors.settle_cpus_per_task(launch)
    note = executors.check_cluster(launch, dry_run)
    if after and launch.cluster != "slurm":
        raise LaunchError("--after needs --cluster slurm (a SLURM job dependency)")
    if after and not dry_run and not job_state(after):
        raise LaunchError(f"--after: SLURM does not know job {after}")
    folder = _absolute(launch.folder or str(Path(_absolute(checkpoint)).parent / "slurm"))
    evals = eval_jobs_for(
        names,
        _absolute(checkpoint),
        splits=list(cfg.eval.splits),
        overrides=list(overrides or []),
        config=config,
        parent_run_dir=_absolute(parent_run_dir),
        parent_run_id=parent_run_id,
    )
    return JobPlan(_eval_jobs(evals, launch, "", after), folder, note, cpus_note=cpus_note)


def render(plan: JobPlan) -> str:
    """The dry run: every job's sbatch script as submitit would write it, the distributed
    environment of the pretraining tasks, the cluster check and the resolved config."""
    out: list[str] = []
    for job in plan.jobs:
        if job.launch.cluster == "slurm":
            params = executors.slurm_parameters(
                job.launch, job.job_name, dependency=plan.dependency(job, {})
            )
            if len(job.tasks) > 1:
                params["map_count"] = len(job.tasks)  # one array task per split
            out += [
                f"# ---- sbatch script: {job.key} ----",
                executors.render_sbatch(params, plan.folder),
            ]
        else:
            num_tasks = job.launch.nodes * executors.tasks_per_node(job.launch)
            out.append(f"# ---- {job.launch.cluster} executor: {job.key}, {num_tasks} task(s)")
        if job.distributed:
            out.append("# ---- environment of every task (submitit TorchDistributedEnvironment)")
            out += [f"# {k}={v}" for k, v in executors.dist_env_summary(job.launch).items()]
    out.append(f"# cluster check: {plan.cluster_check}")
    if plan.cpus_note:
        out.append(f"# cpus per task: {plan.cpus_note}")
    out += [f"# WARNING: {w}" for w in plan.warnings]
    if plan.config is not None:
        out += ["# ---- resolved config", config_to_yaml(plan.config)]
    return "\n".join(out)


def submit(plan: JobPlan) -> SubmittedPlan:
    """Submits the jobs in order, each with ``afterok`` on the id its predecessor got.

    The config's storage credentials are in the submitting environment (which SLURM jobs
    inherit) only while they are submitted: nothing in the job folder holds them."""
    if plan.config is None:
        return _submit(plan)
    with secrets_in_environment(plan.config):
        return _submit(plan)


def _submit(plan: JobPlan) -> SubmittedPlan:
    done = SubmittedPlan(plan, {})
    for job in plan.jobs:
        ex = executors.make_executor(
            job.launch,
            plan.folder,
            job.job_name,
            dependency=plan.dependency(job, done.ids),
            max_requeues=job.max_requeues,
        )
        if len(job.tasks) == 1:
            handles = [ex.submit(job.tasks[0])]
            done.ids[job.key] = handles[0].job_id
        else:
            with ex.batch():
                handles = [ex.submit(task) for task in job.tasks]
            done.ids[job.key] = handles[0].job_id.split("_")[0]
        done.handles[job.key] = handles
    return done


def wait(done: SubmittedPlan, echo: Callable[[str], None] | None = None) -> dict[str, str]:
    """Blocks until every job ends (requeues included); job id -> final state."""
    if all(job.launch.cluster == "slurm" for job in done.plan.jobs):
        elements = {done.ids[key]: len(handles) for key, handles in done.handles.items()}
        return job_outcomes(elements, wait_for_jobs(elements, echo=echo))
    states = {}
    for key, handles in done.handles.items():
        try:
            for handle in handles:
                handle.results()  # every task's; raises the first failure
            states[done.ids[key]] = "COMPLETED"
        except Exception as exc:  # the job's own traceback is in its log
            states[done.ids[key]] = "FAILED"
            if echo is not None:
                echo(f"job {done.ids[key]} failed: {str(exc).splitlines()[-1]}")
    return states
