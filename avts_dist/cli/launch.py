"""avts launch: submit pretraining and evaluation jobs to SLURM through submitit.

  avts launch pretrain --config configs/pretrain/x.yaml [k=v ...] --nodes 2 --gpus-per-node 8 \\
      --partition gpu --time 72:00:00 [--eval-suite sync,ucf101] [--dry-run] [--wait]
  avts launch eval --checkpoint runs/x/export/model.pt --suite sync,esc50 [--after JOBID]
  avts launch cluster up|down|status      # the local single-node SLURM cluster

Cluster options come from, lowest first: the config's launch section, --profile
(configs/cluster/<name>.yaml), launch.x=... overrides, then these flags. The jobs are planned
once (launch/plan.py): --dry-run prints the plan, otherwise it is submitted.
"""

from __future__ import annotations

import argparse
import json
import sys

from avts_dist.cli import accept_trailing_overrides

# Flags that set the LaunchConfig field of the same name (`--profile` picks the layer below).
LAUNCH_FLAGS = (
    "cluster",
    "nodes",
    "gpus_per_node",
    "tasks_per_node",
    "partition",
    "time",
    "account",
    "qos",
    "constraint",
    "mem",
    "cpus_per_task",
    "exclusive",
    "signal",
    "grace_s",
    "max_requeues",
    "folder",
    "network_interface",
)


def _signal_name(text: str) -> str:
    return text.upper().removeprefix("SIG")


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
    g.add_argument(
        "--network-interface",
        help="interface the process groups bind: GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME",
    )
    g.add_argument("--exclusive", action="store_true", default=None)
    g.add_argument(
        "--signal", type=_signal_name, help="preemption/time-limit signal: USR2, USR1, TERM"
    )
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
    e.add_argument("--config", default="", help="config YAML each evaluation loads")
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
        accept_trailing_overrides(sp)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    # Deferred: the launch layer imports submitit and the job callables, which `avts --help`
    # (building every subcommand's parser) does not need.
    from avts_dist.extras import require

    require("submitit", needed_by="avts launch", fix="pip install submitit")
    from launch import executors, plan
    from launch.profiles import resolve_launch_config

    executors.use_local_slurm_conf()
    if args.launch_command == "cluster":
        return executors.local_cluster(args.action)
    flags = {k: getattr(args, k) for k in LAUNCH_FLAGS if getattr(args, k) is not None}
    if args.launch_command == "pretrain":
        cfg = resolve_launch_config(args.config, args.overrides, profile=args.profile, flags=flags)
        jobs = plan.pretrain_plan(
            cfg,
            eval_suite=args.eval_suite,
            eval_time=args.eval_time,
            trainer=args.trainer,
            dry_run=args.dry_run,
        )
    else:
        launch_overrides = [o for o in args.overrides if o.startswith("launch.")]
        cfg = resolve_launch_config(
            args.config or None, launch_overrides, profile=args.profile, flags=flags
        )
        jobs = plan.eval_plan(
            cfg,
            args.checkpoint,
            args.suite,
            after=args.after,
            config=args.config,
            overrides=[o for o in args.overrides if not o.startswith("launch.")],
            parent_run_id=args.parent_run_id,
            parent_run_dir=args.parent_run_dir,
            dry_run=args.dry_run,
        )
    for warning in jobs.warnings:
        _stderr(f"avts launch: warning: {warning}")
    if args.dry_run:
        if jobs.cluster_check.startswith("REFUSED"):
            _stderr(f"avts launch: warning: {jobs.cluster_check}")
        print(plan.render(jobs))
        return 0
    done = plan.submit(jobs)
    summary = done.summary()
    _stderr(f"avts launch: submitted {done.ids}; job folder {jobs.folder}")
    status = 0
    # submitit's debug executor runs a job when its result is asked for: always wait for it.
    if args.wait or all(job.launch.cluster == "debug" for job in jobs.jobs):
        summary["states"] = plan.wait(done, echo=_stderr)
        status = 0 if all(s == "COMPLETED" for s in summary["states"].values()) else 1
    if args.json:
        print(json.dumps(summary))
    return status
