"""avts launch: submit pretraining and evaluation jobs to SLURM through submitit.

  avts launch pretrain --config configs/pretrain/x.yaml [k=v ...] --nodes 2 --gpus-per-node 8 \\
      --partition gpu --time 72:00:00 [--eval-suite sync,ucf101] [--dry-run] [--wait]
  avts launch eval --checkpoint runs/x/export/model.pt --suite sync,esc50 [--after JOBID]
  avts launch cluster up|down|status      # the local single-node SLURM cluster

Cluster options come from, lowest first: the config's launch section, --profile
(configs/cluster/<name>.yaml), launch.x=... overrides, then these flags.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from avts_dist.cli import CLIError
from avts_dist.config import (
    REPO_ROOT,
    config_from_dict,
    config_to_dict,
    config_to_yaml,
    load_config,
    redacted_config_dict,
    secrets_in_environment,
)

LOCAL_SLURM = REPO_ROOT / "launch" / "local_slurm.sh"

# flag dest -> LaunchConfig field
LAUNCH_FLAGS = {
    "cluster": "cluster",
    "nodes": "nodes",
    "gpus_per_node": "gpus_per_node",
    "tasks_per_node": "tasks_per_node",
    "partition": "partition",
    "time": "time",
    "account": "account",
    "qos": "qos",
    "constraint": "constraint",
    "mem": "mem",
    "cpus_per_task": "cpus_per_task",
    "exclusive": "exclusive",
    "signal": "signal",
    "grace_s": "grace_s",
    "max_requeues": "max_requeues",
    "folder": "folder",
}


def _cluster_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster options (override the profile and launch.* keys)")
    g.add_argument("--profile", help="cluster profile: configs/cluster/<NAME>.yaml or a path")
    g.add_argument("--cluster", choices=["slurm", "local", "debug"])
    g.add_argument("--nodes", type=int)
    g.add_argument("--gpus-per-node", type=int)
    g.add_argument("--tasks-per-node", type=int, help="default: --gpus-per-node (one per GPU)")
    g.add_argument("--partition")
    g.add_argument("--time", help="HH:MM:SS, D-HH:MM:SS or minutes")
    g.add_argument("--account")
    g.add_argument("--qos")
    g.add_argument("--constraint")
    g.add_argument("--mem", help="per node, SLURM syntax (64G)")
    g.add_argument("--cpus-per-task", type=int)
    g.add_argument("--exclusive", action="store_true", default=None)
    g.add_argument("--signal", help="preemption/time-limit signal (USR2)")
    g.add_argument("--grace-s", type=int, help="seconds between the signal and the kill")
    g.add_argument("--max-requeues", type=int)
    g.add_argument("--folder", help="submitit job folder (default <run.dir>/slurm)")
    g.add_argument(
        "--dry-run", action="store_true", help="print the sbatch script(s), submit nothing"
    )
    g.add_argument(
        "--wait", action="store_true", help="block until the job(s) end; exit with status"
    )
    g.add_argument("--json", action="store_true", help="print a JSON summary on stdout")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="launch_command", metavar="{pretrain,eval,cluster}")
    sub.required = True

    p = sub.add_parser("pretrain", help="submit a pretraining job (optionally chained evals)")
    p.add_argument("--config", required=True, help="pretraining config YAML")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--eval-suite", default="", help="chain export + these evals (sync,ucf101,..)")
    p.add_argument("--eval-time", help="time limit of each eval job (default --time)")
    # A module:function with the trainer's contract; tests swap in small stand-ins.
    p.add_argument("--trainer", default="avts_dist.train:run_training", help=argparse.SUPPRESS)
    _cluster_flags(p)

    e = sub.add_parser("eval", help="submit evaluation jobs for an exported model")
    e.add_argument(
        "--checkpoint", required=True, help="exported model.pt (or what avts eval takes)"
    )
    e.add_argument("--suite", required=True, help="comma-separated: sync,ucf101,hmdb51,esc50,...")
    e.add_argument("--after", help="SLURM job id that must end OK first (afterok)")
    e.add_argument("--config", default="", help="config YAML passed to avts eval")
    e.add_argument("--parent-run-id", default="", help="MLflow run the evals nest under")
    e.add_argument("--parent-run-dir", default="", help="read the parent id from DIR/mlflow_run_id")
    e.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    _cluster_flags(e)

    c = sub.add_parser("cluster", help="the local single-node SLURM cluster")
    c.add_argument(
        "action",
        choices=["up", "down", "status", "mn-up", "mn-down", "mn-status"],
        help="mn-*: the two-node cluster in network namespaces",
    )
    for sp in (p, e):
        _accept_split_overrides(sp)


def _accept_split_overrides(parser: argparse.ArgumentParser) -> None:
    """argparse takes the KEY=VALUE positionals in one run, so ``a=1 --nodes 2 b=2`` would reject
    ``b=2``; such stray words join ``overrides`` instead."""
    parse = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        ns, extras = parse(args, namespace)
        moved = [x for x in extras if "=" in x and not x.startswith("-")]
        ns.overrides = [*(getattr(ns, "overrides", None) or []), *moved]
        return ns, [x for x in extras if x not in moved]

    parser.parse_known_args = parse_known_args


# ---------------------------------------------------------------------------------------------


def resolve_config(config: str | None, overrides: list[str], args: argparse.Namespace):
    """Config with profile, overrides and flags applied; checked by the dataclasses again."""
    from launch.profiles import profile_overrides

    profile = getattr(args, "profile", None)
    base = load_config(config, overrides) if config else load_config(None, overrides)
    profile = profile or base.launch.profile
    layered = [*profile_overrides(profile), *overrides] if profile else list(overrides)
    cfg = load_config(config, layered) if config else load_config(None, layered)
    data = config_to_dict(cfg)
    for dest, key in LAUNCH_FLAGS.items():
        value = getattr(args, dest, None)
        if value is not None:
            data["launch"][key] = value
    if profile:
        data["launch"]["profile"] = profile
    return config_from_dict(data)


def _absolute(path: str) -> str:
    return path if "://" in path or not path else str(Path(path).resolve())


def _check_cluster(launch, dry_run: bool) -> str:
    """Cluster checks before anything is submitted; returns a note for --dry-run."""
    from launch import executors

    executors.check_options(launch)
    if launch.cluster != "slurm":
        return f"cluster={launch.cluster}: no SLURM checks"
    if dry_run:
        if not executors.slurm_available():
            return "no SLURM cluster reachable: partition/time checked only by syntax"
        try:
            parts = executors.query_partitions()
        except executors.LaunchError as exc:
            return f"not checked against a cluster ({exc})"
        try:
            part = executors.check_against_cluster(launch, parts)
        except executors.LaunchError as exc:
            # A dry run still shows the script; this cluster would refuse it.
            print(
                f"avts launch: warning: the reachable cluster would refuse this: {exc}",
                file=sys.stderr,
            )
            return f"REFUSED by the reachable cluster: {exc}"
    else:
        part = executors.check_against_cluster(launch, executors.query_partitions())
    return f"checked against partition {part.name!r} (MaxTime {part.raw.get('MaxTime')})"


def _eval_launch(launch, eval_time: str | None):
    """Eval jobs: one task, at most one GPU, same partition/account."""
    import dataclasses

    return dataclasses.replace(
        launch,
        nodes=1,
        tasks_per_node=1,
        gpus_per_node=min(launch.gpus_per_node, 1),
        time=eval_time or launch.time,
        exclusive=False,
        max_requeues=0,
    )


def _print_script(title: str, text: str) -> None:
    print(f"# ---- {title} ----")
    print(text)


def _dry_run_pretrain(cfg, folder: str, note: str, suite: list[str], eval_launch) -> int:
    from launch import evaljobs, executors

    params = executors.slurm_parameters(cfg.launch, cfg.run.name)
    if cfg.launch.cluster == "slurm":
        _print_script("sbatch script: pretrain", executors.render_sbatch(params, folder))
    else:
        print(
            f"# ---- {cfg.launch.cluster} executor: {executors.tasks_per_node(cfg.launch)} task(s)"
        )
    print("# ---- environment of every task (submitit TorchDistributedEnvironment)")
    for k, v in executors.dist_env_summary(cfg.launch).items():
        print(f"# {k}={v}")
    print(f"# cluster check: {note}")
    if suite:
        export_p = executors.slurm_parameters(
            eval_launch, f"{cfg.run.name}-export", dependency="afterok:<pretrain job id>"
        )
        _print_script("sbatch script: export", executors.render_sbatch(export_p, folder))
        for name in suite:
            p = executors.slurm_parameters(
                eval_launch, f"{cfg.run.name}-eval-{name}", dependency="afterok:<export job id>"
            )
            items = evaljobs.array_items(name, list(cfg.eval.splits))
            if len(items) > 1:
                p["map_count"] = len(items)  # one array task per split
            _print_script(f"sbatch script: eval {name}", executors.render_sbatch(p, folder))
    print("# ---- resolved config")
    print(config_to_yaml(cfg))
    return 0


def _submit_evals(
    launch,
    folder: str,
    run_name: str,
    suite: list[str],
    checkpoint: str,
    *,
    splits: list[int],
    overrides: list[str],
    config: str,
    parent_run_dir: str,
    parent_run_id: str,
    dependency: str | None,
) -> dict[str, str]:
    from launch import evaljobs, executors

    ids: dict[str, str] = {}
    jobs = evaljobs.eval_jobs_for(
        suite,
        checkpoint,
        splits=splits,
        overrides=overrides,
        config=config,
        parent_run_dir=parent_run_dir,
        parent_run_id=parent_run_id,
    )
    for name, callables in jobs.items():
        ex = executors.make_executor(
            launch, folder, f"{run_name}-eval-{name}", dependency=dependency, max_requeues=0
        )
        if len(callables) == 1:
            ids[name] = ex.submit(callables[0]).job_id
        else:
            with ex.batch():
                subs = [ex.submit(c) for c in callables]
            ids[name] = subs[0].job_id.split("_")[0]
    return ids


def _finish(summary: dict[str, Any], args, wait_ids: list[str], local_jobs: list) -> int:
    from launch import executors

    status = 0
    if args.wait:
        if local_jobs:
            states = {}
            for job in local_jobs:
                try:
                    job.results()  # every task's; raises the first failure
                    states[job.job_id] = "COMPLETED"
                except Exception as exc:  # the job's own traceback is in its log
                    states[job.job_id] = "FAILED"
                    print(f"job {job.job_id} failed: {str(exc).splitlines()[-1]}", file=sys.stderr)
        else:
            states = executors.wait_for_jobs(wait_ids)
        summary["states"] = states
        status = 0 if all(s == "COMPLETED" for s in states.values()) else 1
    if args.json:
        print(json.dumps(summary))
    return status


def run_pretrain(args: argparse.Namespace) -> int:
    from launch import evaljobs, executors

    cfg = resolve_config(args.config, args.overrides, args)
    cfg.run.dir = _absolute(cfg.run.dir)
    cfg.checkpoint.dir = _absolute(cfg.checkpoint.dir)
    if cfg.resume == "none":
        # A job SLURM restarts by itself (node failure, requeue) must continue, not start over.
        cfg.resume = "auto"
    suite = evaljobs.parse_suite(args.eval_suite) if args.eval_suite else []
    eval_launch = _eval_launch(cfg.launch, args.eval_time)
    note = _check_cluster(cfg.launch, args.dry_run)
    if suite:
        executors.check_options(eval_launch)
        if cfg.launch.cluster != "slurm":
            raise CLIError(
                "--eval-suite chains jobs with SLURM dependencies: needs --cluster slurm"
            )
    folder = _absolute(cfg.launch.folder or str(Path(cfg.run.dir) / "slurm"))
    cfg.launch.folder = folder
    if args.dry_run:
        return _dry_run_pretrain(cfg, folder, note, suite, eval_launch)
    # Credentials reach the jobs through their environment; the job folder gets the redacted
    # config (avts_dist.config.secrets_in_environment).
    with secrets_in_environment(cfg):
        return _submit_pretrain(cfg, args, folder, suite, eval_launch)


def _submit_pretrain(cfg, args, folder, suite, eval_launch) -> int:
    from launch import executors
    from launch.pretrain import PretrainJob

    job = executors.make_executor(cfg.launch, folder, cfg.run.name).submit(
        PretrainJob(
            redacted_config_dict(cfg), trainer=args.trainer, max_requeues=cfg.launch.max_requeues
        )
    )
    summary: dict[str, Any] = {
        "pretrain": job.job_id,
        "folder": folder,
        "run_dir": cfg.run.dir,
        "logs": str(Path(folder) / f"{job.job_id}_<rank>_log.out"),
    }
    print(
        f"avts launch: pretrain job {job.job_id} submitted; logs {summary['logs']}", file=sys.stderr
    )
    wait_ids = [job.job_id]
    if suite:
        export_path = str(Path(cfg.run.dir) / "export" / "model.pt")
        from launch.evaljobs import ExportJob

        export_job = executors.make_executor(
            eval_launch,
            folder,
            f"{cfg.run.name}-export",
            dependency=f"afterok:{job.job_id}",
            max_requeues=0,
        ).submit(ExportJob(checkpoint=cfg.checkpoint.dir, out=export_path))
        summary["export"] = export_job.job_id
        summary["evals"] = _submit_evals(
            eval_launch,
            folder,
            cfg.run.name,
            suite,
            export_path,
            splits=list(cfg.eval.splits),
            overrides=[],
            config=str(Path(cfg.run.dir) / "config.yaml"),
            parent_run_dir=cfg.run.dir,
            parent_run_id="",
            dependency=f"afterok:{export_job.job_id}",
        )
        print(
            f"avts launch: export job {export_job.job_id}, eval jobs {summary['evals']} "
            f"(after {job.job_id})",
            file=sys.stderr,
        )
        wait_ids += [export_job.job_id, *summary["evals"].values()]
    local_jobs = [job] if cfg.launch.cluster != "slurm" else []
    return _finish(summary, args, wait_ids, local_jobs)


def run_eval(args: argparse.Namespace) -> int:
    from launch import evaljobs, executors

    suite = evaljobs.parse_suite(args.suite)
    cfg = resolve_config(
        args.config or None, [o for o in args.overrides if o.startswith("launch.")], args
    )
    launch = _eval_launch(cfg.launch, None)
    note = _check_cluster(launch, args.dry_run)
    if args.after and launch.cluster != "slurm":
        raise CLIError("--after needs --cluster slurm (a SLURM job dependency)")
    if args.after and not args.dry_run and not executors.job_state(args.after):
        raise CLIError(f"--after: SLURM does not know job {args.after}")
    folder = _absolute(launch.folder or str(Path(args.checkpoint).resolve().parent / "slurm"))
    dependency = f"afterok:{args.after}" if args.after else None
    eval_overrides = [o for o in args.overrides if not o.startswith("launch.")]
    if args.dry_run:
        for name in suite:
            items = evaljobs.array_items(name, list(cfg.eval.splits))
            p = executors.slurm_parameters(launch, f"eval-{name}", dependency=dependency)
            if len(items) > 1:
                p["map_count"] = len(items)
            _print_script(f"sbatch script: eval {name}", executors.render_sbatch(p, folder))
        print(f"# cluster check: {note}")
        return 0
    ids = _submit_evals(
        launch,
        folder,
        "avts",
        suite,
        _absolute(args.checkpoint),
        splits=list(cfg.eval.splits),
        overrides=eval_overrides,
        config=args.config,
        parent_run_dir=_absolute(args.parent_run_dir),
        parent_run_id=args.parent_run_id,
        dependency=dependency,
    )
    print(f"avts launch: eval jobs {ids}", file=sys.stderr)
    return _finish({"evals": ids, "folder": folder}, args, list(ids.values()), [])


def run_cluster(args: argparse.Namespace) -> int:
    if os.geteuid() != 0 and not args.action.endswith("status"):
        raise CLIError("the local SLURM cluster needs root (it installs packages, starts daemons)")
    return subprocess.run(["bash", str(LOCAL_SLURM), args.action], check=False).returncode


def run(args: argparse.Namespace) -> int:
    # The local cluster's config, when the machine has no slurm.conf of its own.
    local_conf = Path(os.environ.get("AVTS_SLURM_DIR", "/tmp/avts-slurm")) / "slurm.conf"
    no_system_conf = not Path("/etc/slurm/slurm.conf").exists()
    if "SLURM_CONF" not in os.environ and local_conf.exists() and no_system_conf:
        os.environ["SLURM_CONF"] = str(local_conf)
    if args.launch_command == "cluster":
        return run_cluster(args)
    if args.launch_command == "eval":
        return run_eval(args)
    return run_pretrain(args)
