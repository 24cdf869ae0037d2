"""The quickstart behind `make demo`, on the embedded synthetic corpus:

1. ``avts synth``   writes the corpus to ``data/synth`` and ``avts inspect`` summarizes it;
2. ``avts train``   pretrains twice: with the curriculum (easy, then easy + hard negatives) and
   without it (the ablation: the final mix from step 0);
3. ``avts eval``    runs the sync evaluation on each run, then the low-label job on the rhythm
   labels (the temporal pattern sync has to learn; docs/results.md 1.2): the curriculum run's
   video net against the same net from scratch, fine-tuned and linearly probed with k = 4 and
   all labelled clips per class, as MLflow child runs;
4. ``avts compare`` writes the side-by-side table and plots to ``runs/demo_compare``.

This is one seed at one k of the study ``make study`` runs (docs/results.md: 3 pretraining and 3
fine-tuning seeds, k = 1 ... all, five arms, intervals). In a checkout without the low-label job
(``avts eval lowlabel``), step 3 runs the older ``avts eval synthetic`` instead and says so.

Every step is the ``avts`` command a user would type; each is printed before it runs.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from eval.registry import JOBS

# The study's corpus shape (docs/results.md 1.2) at a third of its size: 40 labelled eval_train
# clips (about 13 per rhythm class) and 24 eval_test clips, never pretrained on.
LOWLABEL = "lowlabel" in JOBS
EVAL_SPLITS = ["--eval-train-fraction", "0.25", "--eval-test-fraction", "0.15"]
NUM_VIDEOS = "160" if LOWLABEL else "96"

RUNS = {
    "demo_curriculum": "configs/pretrain/quickstart.yaml",
    "demo_no_curriculum": "configs/pretrain/no_curriculum.yaml",
}


def avts(*args: str) -> None:
    print(f"\n$ avts {shlex.join(args)}", flush=True)
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "avts_dist", *args], check=True)
    print(f"  ({time.monotonic() - start:.0f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--data", default="data/synth", help="where the synthetic corpus goes")
    parser.add_argument("--runs", default="runs", help="parent folder of the run directories")
    parser.add_argument("--nproc", type=int, default=1, help="training processes per run")
    args = parser.parse_args(argv)
    start = time.monotonic()

    avts(
        "synth", "--out", args.data, "--num-videos", NUM_VIDEOS, "--seconds", "4", "--fps", "8",
        "--size", "32", "--sample-rate", "16000", "--num-classes", "4", "--shard-size", "16",
        "--seed", "0", "--num-workers", "2", *(EVAL_SPLITS if LOWLABEL else []),
    )  # fmt: skip
    avts("inspect", args.data)

    run_ids = []
    for name, config in RUNS.items():
        run_dir = Path(args.runs) / name
        # The demo's own runs start fresh each time; other runs under runs/ are left alone.
        shutil.rmtree(run_dir, ignore_errors=True)
        avts(
            "train", "--config", config, "--nproc", str(args.nproc),
            f"run.name={name}", f"run.dir={run_dir}", f"data.url={args.data}",
            "tracking.experiment=avts-demo",
        )  # fmt: skip
        ckpt = str(run_dir / "checkpoints")
        avts("eval", "sync", "--checkpoint", ckpt)
        if LOWLABEL and name == "demo_curriculum":
            avts(
                "eval", "lowlabel", "--checkpoint", ckpt, "eval.lowlabel.label_set=rhythm",
                "eval.lowlabel.shots=[4, 0]", "eval.lowlabel.seeds=[0]",
                "eval.lowlabel.scratch=true", "eval.batch_size=8",
            )  # fmt: skip
        elif not LOWLABEL:
            print("\n(no `avts eval lowlabel` in this checkout: the older synthetic evaluation)")
            avts(
                "eval", "synthetic", "--checkpoint", ckpt, "--config",
                "configs/eval/toy_cpu.yaml", f"eval.datasets.synthetic={args.data}",
            )  # fmt: skip
        run_ids.append((run_dir / "mlflow_run_id").read_text().strip())

    out = Path(args.runs) / "demo_compare"
    avts("compare", "--runs", *run_ids, "--out", str(out))
    print(f"\ndemo finished in {time.monotonic() - start:.0f} s; report in {out}/", flush=True)
    print("the whole study, with intervals: make study (docs/results.md, docs/study.md)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except subprocess.CalledProcessError as exc:
        print(f"demo: step failed with exit status {exc.returncode}", file=sys.stderr)
        sys.exit(exc.returncode)
