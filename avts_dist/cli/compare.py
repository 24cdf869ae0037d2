"""avts compare: compare MLflow runs side by side.

  avts compare --experiment avts --out compare/                 (every run of the experiment)
  avts compare --runs RUN_A RUN_B --metrics 'ucf101/*' 'sync/acc_*'
  avts compare --tracking-uri http://mlflow:5000 --experiment avts
  avts compare --best sync/acc --top 3                           (checkpoints ranked)
  avts compare --study s1 --out results/s1         (a study's tables T1-T5, docs/results.md)

Rows are pretraining runs; their child evaluation runs (avts eval) are grouped under them and
their metrics become columns (<job>/<metric>), next to the parameters that differ between runs
(e.g. curriculum.enabled). --out writes compare.csv, compare.html and PNG plots (training
curves, sync accuracy vs offset, downstream accuracy bars).

--best METRIC ranks checkpoints instead: every saved checkpoint is an MLflow LoggedModel of its
pretraining run, and avts eval links its metrics to it; MLflow's search_logged_models orders
them by METRIC (better first: higher for accuracies, lower for losses) and each is printed with
the path of its weights.

--study NAME finds the runs tagged avts.study=NAME (avts study) and builds the protocol's tables
T1-T5 (mean ± 95% CI over pretraining seeds, paired differences); --out then writes results.md,
results.json and accuracy_vs_k.png. Cells nobody ran print "not run".
"""

from __future__ import annotations

import argparse

from avts_dist.cli import CLIError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--study", default=None, help="a study's tables T1-T5 (tag avts.study)")
    parser.add_argument("--experiment", default=None, help="MLflow experiment (default: avts)")
    parser.add_argument("--runs", nargs="+", default=None, metavar="ID", help="run ids")
    parser.add_argument(
        "--metrics",
        nargs="+",
        default=None,
        metavar="PATTERN",
        help="metric names or glob patterns (default: headline accuracies and losses)",
    )
    parser.add_argument(
        "--curves",
        nargs="+",
        default=None,
        metavar="METRIC",
        help="training metrics to plot against step (default: loss, val acc)",
    )
    parser.add_argument("--out", default=None, help="folder for CSV, HTML and PNG plots")
    parser.add_argument(
        "--best", default=None, metavar="METRIC", help="rank checkpoints by METRIC (e.g. sync/acc)"
    )
    parser.add_argument("--top", type=int, default=5, help="with --best: how many (default 5)")
    parser.add_argument(
        "--lower-is-better",
        action="store_true",
        default=None,
        help="with --best: rank ascending (default: from the metric's name)",
    )
    parser.add_argument("--tracking-uri", default="", help="MLflow URI (default: ./mlruns)")


def run_study(args: argparse.Namespace) -> int:
    from report.study_tables import study_tables

    others = ("runs", "experiment", "metrics", "curves", "best")
    if any(getattr(args, name, None) for name in others):
        raise CLIError("--study builds the study's tables: it takes only --out and --tracking-uri")
    try:
        result = study_tables(args.study, tracking_uri=args.tracking_uri, out_dir=args.out)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    print(result.markdown(f"avts compare --study {args.study}"))
    for kind, path in result.files.items():
        print(f"{kind}: {path}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.study:
        return run_study(args)
    if args.best:
        return _best(args)
    # Deferred: MLflow and matplotlib load only when comparing, not for `avts --help`.
    from report.compare import compare_runs

    try:
        comp = compare_runs(
            tracking_uri=args.tracking_uri,
            experiment=args.experiment,
            run_ids=args.runs,
            metrics=args.metrics,
            curves=args.curves,
            out_dir=args.out,
        )
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    print(comp.table())
    for kind, path in comp.files.items():
        print(f"{kind}: {path}")
    return 0


def _best(args: argparse.Namespace) -> int:
    from report.best import best_checkpoints, format_best
    from report.metric_docs import DOWN, describe_metric

    if args.top < 1:
        raise CLIError("--top must be >= 1")
    lower = args.lower_is_better
    if lower is None:
        lower = describe_metric(args.best)[1] == DOWN
    try:
        best = best_checkpoints(
            args.best, tracking_uri=args.tracking_uri, experiment=args.experiment,
            top=args.top, lower_is_better=lower,
        )  # fmt: skip
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    print(format_best(args.best, best, lower))
    return 0 if best else 1
