"""avts eval: run an evaluation job against a pretrained checkpoint.

  avts eval sync       --checkpoint runs/quickstart/checkpoints        (held-out sync accuracy)
  avts eval ucf101     --checkpoint model.pt eval.datasets.ucf101=s3://bucket/ucf101
  avts eval hmdb51     --checkpoint model.pt eval.datasets.hmdb51=data/hmdb51 eval.splits=[1]
  avts eval esc50      --checkpoint model.pt eval.datasets.esc50=data/esc50 eval.feature_layer=layer3
  avts eval dcase2014  --checkpoint model.pt eval.datasets.dcase2014=data/dcase2014
  avts eval multimodal --checkpoint model.pt eval.datasets.multimodal=data/ucf101
  avts eval synthetic  --checkpoint model.pt eval.datasets.synthetic=data/synth

--checkpoint is a checkpoint directory (exported on the fly with `avts export`) or an exported
.pt. The config is --config if given, else the pretraining run's config.yaml (found next to the
checkpoint), else the defaults; key=value overrides apply last. Each job logs to MLflow as a
child run of the pretraining run (its id from <run dir>/mlflow_run_id, or --parent-run-id).
"""

from __future__ import annotations

import argparse
import json

from avts_dist.cli import CLIError

JOBS = ("sync", "ucf101", "hmdb51", "esc50", "dcase2014", "multimodal", "synthetic")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("job", choices=JOBS, help="evaluation to run")
    parser.add_argument("--checkpoint", required=True, help="checkpoint dir or exported .pt")
    parser.add_argument("--config", default=None, help="YAML config (default: the run's own)")
    parser.add_argument("--parent-run-id", default="", help="MLflow run to nest under")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI")
    parser.add_argument("--out-dir", default="", help="local folder for artifacts")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    _accept_trailing_overrides(parser)


def _accept_trailing_overrides(parser: argparse.ArgumentParser) -> None:
    """argparse consumes all positionals at once, so ``job --checkpoint X k=v`` would reject
    ``k=v``; the stray ``key=value`` words are moved into ``overrides`` instead."""
    parse = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        ns, extras = parse(args, namespace)
        moved = [e for e in extras if "=" in e and not e.startswith("-")]
        ns.overrides = [*(getattr(ns, "overrides", None) or []), *moved]
        return ns, [e for e in extras if e not in moved]

    parser.parse_known_args = parse_known_args


def _explicit_model_keys(config_path: str | None, overrides: list[str]) -> set[str]:
    from avts_dist.config import _read_yaml_layers, resolve_config_path

    keys = {o.split("=", 1)[0][len("model.") :] for o in overrides if o.startswith("model.")}
    if config_path:
        for layer in _read_yaml_layers(resolve_config_path(config_path)):
            keys |= set((layer.get("model") or {}).keys())
    return keys


def run(args: argparse.Namespace) -> int:
    from avts_dist.config import load_config
    from eval import EvalError, load_pretrained, run_eval

    overrides = list(args.overrides)
    if args.parent_run_id:
        overrides.append(f"eval.parent_run_id={args.parent_run_id}")
    if args.tracking_uri is not None:
        overrides.append(f"tracking.uri={args.tracking_uri}")
    if args.out_dir:
        overrides.append(f"eval.out_dir={args.out_dir}")
    overrides.append(f"eval.checkpoint={args.checkpoint}")
    try:
        pre = load_pretrained(args.checkpoint)
        base = args.config
        if base is None and pre.run_dir is not None and (pre.run_dir / "config.yaml").exists():
            base = str(pre.run_dir / "config.yaml")
        cfg = load_config(base, overrides)
        result = run_eval(
            args.job, cfg, pre, explicit_model_keys=_explicit_model_keys(args.config, overrides)
        )
    except EvalError as exc:
        raise CLIError(str(exc)) from None
    if args.json:
        print(
            json.dumps(
                {
                    "job": result.job,
                    "run_id": result.run_id,
                    "parent_run_id": result.parent_run_id,
                    "out_dir": result.out_dir,
                    "metrics": result.metrics,
                },
                indent=1,
                default=float,
            )
        )
    else:
        print(
            f"avts eval {result.job}: {result.seconds:.1f}s, artifacts in {result.out_dir}"
            + (f", MLflow run {result.run_id}" if result.run_id else "")
            + (f" (child of {result.parent_run_id})" if result.parent_run_id else "")
        )
        for k in sorted(result.metrics):
            if "/" not in k or k.count("/") == 1 and k.split("/")[1] in ("acc", "acc_video"):
                print(f"  {k:40s} {result.metrics[k]:.4f}")
    return 0
