"""What the synthetic corpus lets an offset metric measure: the event-time oracle on both versions.

    .venv/bin/python tests/benchmarks/oracle_offsets.py --out oracle_offsets.json \\
        --plot docs/img/synth_oracle_offsets.png

The oracle sees only event times (``avts_dist.data.synthetic_v2.oracle_scores``: minus the
events without a partner within 20 ms, on one-second windows). For each corpus version it takes
the events of ``--num-clips`` clips of 4 s at 8 fps (the study's, the same draws as ``make_clip``
of that seed and index: the event train is the clip's first draw) and reports, per offset of the
+-1.0 s grid in 0.1 s steps, the in-sync-against-shifted pair accuracy and the top-1 accuracy of
offset classification (`avts eval sync`'s protocol: the best of 21 audio shifts; a tie is a
miss). A perfect timing observer gets 1.0 everywhere on a corpus where only time matters.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from avts_dist.data.synthetic import RHYTHMS, rhythm_events  # noqa: E402
from avts_dist.data.synthetic_v2 import jittered_events, oracle_offset_curve  # noqa: E402

GRID = [round(0.1 * k, 6) for k in range(-10, 11)]


def event_trains(version: int, num_clips: int, seconds: float, fps: float, seed: int) -> list:
    delays = list(RHYTHMS.values())
    trains = []
    for i in range(num_clips):
        rng = np.random.default_rng([seed, i])
        rhythm = i % len(delays)
        if version == 1:
            trains.append(rhythm_events(rng, rhythm, seconds, fps)[0])
        else:
            trains.append(jittered_events(rng, delays[rhythm], seconds, fps, delays)[0])
    return trains


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON file")
    parser.add_argument("--plot", default="", help="PNG file (optional)")
    parser.add_argument("--num-clips", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = {"grid_s": GRID, "num_clips": args.num_clips, "seconds": 4.0, "fps": 8.0}
    for version in (1, 2):
        trains = event_trains(version, args.num_clips, 4.0, 8.0, args.seed)
        curve = oracle_offset_curve(trains, 4.0, GRID, seed=args.seed)
        result[f"v{version}"] = {
            # No pair at offset 0 (the in-sync audio against itself): null.
            "pair_acc": [None if np.isnan(curve[o][0]) else curve[o][0] for o in GRID],
            "top1": [curve[o][1] for o in GRID],
            "top1_mean": float(np.mean([curve[o][1] for o in GRID])),
        }
    Path(args.out).write_text(json.dumps(result, indent=1))
    if args.plot:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7, 3))
        axes = fig.subplots(1, 2, sharey=True)
        for version, style in ((1, "o--"), (2, "s-")):
            res = result[f"v{version}"]
            pair = [np.nan if a is None else a for a in res["pair_acc"]]
            axes[0].plot(GRID, pair, style, ms=3, label=f"version {version}")
            axes[1].plot(GRID, res["top1"], style, ms=3, label=f"version {version}")
        axes[0].set_title("in sync vs shifted (pair accuracy)", fontsize=9)
        axes[1].set_title("offset class, top-1 of 21", fontsize=9)
        for ax in axes:
            ax.set_xlabel("audio offset (s)")
            ax.set_ylim(-0.02, 1.02)
            ax.legend(fontsize=7)
        axes[0].set_ylabel("event-time oracle accuracy")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=100)
    print(json.dumps({k: result[k]["top1_mean"] for k in ("v1", "v2")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
