"""avts study: the protocol's grid of pretrainings and evaluations, run and tracked as one study.

    avts study --config configs/study/main.yaml [--cluster local|debug] [--dry-run]
               [--runs DIR] [--tracking-uri URI] [--no-wait] [key=value ...]

Arms x pretraining seeds, each pretrained net's evaluations after it (docs/study.md). With
--cluster local: job arrays on the local SLURM cluster (brought up with `avts launch cluster up`);
with --cluster debug: everything in this process, serially. A re-run reuses every pretraining
with a complete checkpoint at its last step and every evaluation whose results exist; --dry-run
prints the plan (what runs, what is reused, the arrays and dependencies) and runs nothing.
Then: avts compare --study NAME. Exit status: 0 all done, 1 some element failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import sys

from avts_dist.cli import accept_trailing_overrides


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML under configs/study/")
    parser.add_argument("--cluster", choices=["local", "debug"], default="local")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    parser.add_argument("--runs", help="parent folder of the study's run dirs (key `runs`)")
    parser.add_argument("--tracking-uri", help="MLflow store or server (key `tracking_uri`)")
    parser.add_argument(
        "--no-wait", action="store_true", help="--cluster local: return once submitted"
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="study config overrides")
    accept_trailing_overrides(parser)


def _echo(msg: str) -> None:
    print(f"avts study: {msg}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from launch import study as S

    overrides = list(args.overrides)
    if args.runs:
        overrides.append(f"runs={args.runs}")
    if args.tracking_uri:
        overrides.append(f"tracking_uri={args.tracking_uri}")
    study = S.load_study(args.config, overrides)
    plan = S.plan(study, args.cluster)
    if args.cluster == "local":
        from avts_dist.extras import require

        require("submitit", needed_by="avts study --cluster local", fix="pip install submitit")
        from launch import executors

        executors.use_local_slurm_conf()
        # No cluster, or one that refuses the jobs: one clear error before anything runs.
        check = executors.check_cluster(plan.units[0].config.launch, dry_run=args.dry_run)
        _echo(f"cluster check: {check}")
    print(S.render_plan(plan), flush=True)
    if args.dry_run:
        return 0
    states = S.execute(plan, _echo, wait=not args.no_wait)
    lines, failed = S.summary_lines(states)
    print(f"study {study.name}: {len(states)} element(s)", *lines, sep="\n")
    if failed:
        print(f"study {study.name}: {len(failed)} failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"next: avts compare --study {study.name} --tracking-uri {S.tracking_uri(study)}")
    return 0
