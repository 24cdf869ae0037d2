"""The low-label job's units for the study budget (docs/results.md 1.8):

    .venv/bin/python tests/benchmarks/bench_lowlabel.py --data DATASET --out lowlabel.json

DATASET needs the labelled pool (`avts synth ... --eval-train-fraction F --eval-test-fraction G`).
The net is the quickstart's (configs/pretrain/quickstart.yaml, MC3-18 width 8, 32 px, 8 frames
at 8 fps) from random weights: the cost does not depend on the weights. Measured, each in this
one process, CPU seconds (``time.process_time``, all threads) and wall seconds:

- ``finetune``: one fine-tune cell of `avts eval lowlabel`, k = all, of ``--recipe`` (default
  finetune; multimodal / silent_audio for T3, ``--arch``): ``--steps`` optimizer steps at
  ``--batch-size`` (protocol: 60 at 8) plus scoring every eval_test clip (3 windows);
- ``probe_features``: one net's probe features, eval_train (4 windows per clip) and eval_test
  (3 windows per clip);
- ``probe_fit``: one (k = all, f) logistic-regression fit and scoring on those features.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from avts_dist.config import load_config  # noqa: E402
from avts_dist.data import DatasetIndex  # noqa: E402
from avts_dist.data.synthetic import use_label_set  # noqa: E402
from avts_dist.export import export_payload, save_exported  # noqa: E402
from avts_dist.models import build_model  # noqa: E402
from eval.common import EvalRuntime, JobIO  # noqa: E402
from eval.lowlabel import _finetune_cell, probe_accuracy, window_features  # noqa: E402
from eval.pretrained import resolve_pretrained  # noqa: E402
from eval.splits import split_plans  # noqa: E402


def _timed(fn):
    cpu, wall = time.process_time(), time.perf_counter()
    value = fn()
    return value, {
        "cpu_s": round(time.process_time() - cpu, 2),
        "wall_s": round(time.perf_counter() - wall, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--recipe",
        default="finetune",
        choices=["finetune", "multimodal", "silent_audio"],
        help="the fine-tune cell's recipe (multimodal, silent_audio: T3)",
    )
    parser.add_argument("--arch", default="two_stream", choices=["two_stream", "early_fusion"])
    args = parser.parse_args()

    cfg = load_config(
        "configs/pretrain/quickstart.yaml",
        [
            f"data.url={args.data}",
            f"eval.batch_size={args.batch_size}",
            f"eval.lowlabel.steps={args.steps}",
            "eval.progress=false",
            "eval.device=cpu",
            f"model.arch={args.arch}",
        ],
    )
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "model.pt")
        save_exported(export_payload(build_model(cfg.model), cfg.model), path)
        pre = resolve_pretrained(path)
    idx = use_label_set(DatasetIndex.load(args.data), cfg.eval.lowlabel.label_set)
    (plan,) = split_plans(idx, splits=[1], usable=idx.has_video.astype(bool))
    io = JobIO(idx, cfg.data, EvalRuntime.from_config(cfg.eval), Path(tmp), lambda *a: None, "")
    ll = cfg.eval.lowlabel
    labels = idx.label.astype("int64")
    acc, finetune = _timed(
        lambda: _finetune_cell(
            ll,
            pre,
            idx,
            plan.train_rows,
            plan.test_rows,
            io,
            recipe=args.recipe,
            init="pretrained",
            f=0,
            desc="",
        )
    )
    net = pre.video_net()
    (train_feats, test_feats), features = _timed(
        lambda: (
            window_features(net, idx, plan.train_rows, io, ll.probe_windows, "").mean(1),
            window_features(net, idx, plan.test_rows, io, ll.test_windows, ""),
        )
    )
    _, fit = _timed(
        lambda: probe_accuracy(
            train_feats,
            labels[plan.train_rows],
            test_feats,
            labels[plan.test_rows],
            len(idx.classes),
            ll.c,
            0,
        )
    )
    result = {
        "data": args.data,
        "num_eval_train": int(plan.train_rows.size),
        "num_eval_test": int(plan.test_rows.size),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "recipe": args.recipe,
        "arch": args.arch,
        "torch_threads": torch.get_num_threads(),
        "finetune": finetune,
        "probe_features": features,
        "probe_fit": fit,
        "finetune_acc_random_init": acc,
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
