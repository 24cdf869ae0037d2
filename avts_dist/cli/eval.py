"""avts eval: run an evaluation job against a pretrained checkpoint.

  avts eval sync       --checkpoint runs/quickstart/checkpoints        (held-out sync accuracy)
  avts eval ucf101     --checkpoint model.pt eval.datasets.ucf101=s3://bucket/ucf101
  avts eval hmdb51     --checkpoint model.pt eval.datasets.hmdb51=data/hmdb51 eval.splits=[1]
  avts eval esc50      --checkpoint model.pt eval.datasets.esc50=data/esc50 eval.probe.feature_layer=layer3
  avts eval dcase2014  --checkpoint model.pt eval.datasets.dcase2014=data/dcase2014
  avts eval multimodal --checkpoint model.pt eval.datasets.multimodal=data/ucf101
  avts eval synthetic  --checkpoint model.pt eval.datasets.synthetic=data/synth
  avts eval lowlabel   --checkpoint model.pt data.url=data/study eval.batch_size=8 \
      eval.lowlabel.scratch=true           (k labelled clips per class: docs/results.md 1.3-1.6)

--checkpoint is a checkpoint directory (exported on the fly) or an exported .pt. The config is
--config if given, else the pretraining run's config.yaml (found next to the checkpoint), else
the defaults; key=value overrides apply last. Each job logs to MLflow as a child run of the
pretraining run (its id from <run dir>/mlflow_run_id, or --parent-run-id).
"""

from __future__ import annotations

import argparse
import json

from avts_dist.cli import CLIError, accept_trailing_overrides
from eval.registry import JOBS, EvalError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("job", choices=list(JOBS), help="evaluation to run")
    parser.add_argument("--checkpoint", required=True, help="checkpoint dir or exported .pt")
    parser.add_argument("--config", default=None, help="YAML config (default: the run's own)")
    parser.add_argument("--parent-run-id", default="", help="MLflow run to nest under")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI")
    parser.add_argument("--out-dir", default="", help="local folder for artifacts")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    accept_trailing_overrides(parser)


def run(args: argparse.Namespace) -> int:
    # Deferred: torch, scikit-learn and the models load only when an evaluation runs, not for
    # `avts --help` (which builds every subcommand's parser).
    from eval.run import evaluate

    try:
        result = evaluate(
            args.job,
            args.checkpoint,
            config=args.config,
            overrides=args.overrides,
            parent_run_id=args.parent_run_id,
            tracking_uri=args.tracking_uri,
            out_dir=args.out_dir,
        )
    except EvalError as exc:
        raise CLIError(str(exc)) from None
    if args.json:
        summary = {
            "job": result.job,
            "run_id": result.run_id,
            "parent_run_id": result.parent_run_id,
            "out_dir": result.out_dir,
            "metrics": result.metrics,
        }
        print(json.dumps(summary, indent=1, default=float))
        return 0
    print("\n".join(summary_lines(result)))
    return 0


def summary_lines(result) -> list[str]:
    """The headline table of the job (report/headline.py), then where the full metrics went."""
    from eval.registry import get_job
    from report.headline import format_headline, headline_rows

    lines = [f"avts eval {result.job}: {result.seconds:.1f} s"]
    rows = headline_rows(get_job(result.job).kind, result.metrics)
    lines += format_headline(rows) if rows else ["  (no headline figures for this job)"]
    lines.append(f"full metrics ({len(result.metrics)}): {result.out_dir}/metrics.json")
    if result.run_id:
        run = f"MLflow run {result.run_id}"
        url = result.extra.get("run_url", "")
        if url and url != result.run_id:
            run += f" ({url})"
        if result.parent_run_id:
            run += f", child of {result.parent_run_id}"
        if result.extra.get("model_id"):
            run += f", linked to checkpoint model {result.extra['model_id']}"
        lines.append(run)
    return lines
