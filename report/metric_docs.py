"""What each metric of the comparison means and which direction is better.

One table of glob patterns (first match wins), used by the report's legend and table arrows and
open to any other display of the same metrics (e.g. an evaluation's headline table).
"""

from __future__ import annotations

import fnmatch

__all__ = ["DOWN", "METRIC_DOCS", "UP", "describe_metric"]

UP, DOWN = "higher", "lower"
# (glob, meaning, better direction); the first match wins.
METRIC_DOCS: tuple[tuple[str, str, str], ...] = (
    ("loss", "pretraining loss at the last step (AVTS contrastive loss, plus the sync head's "
     "BCE when the model has one)", DOWN),
    ("train/loss", "pretraining loss at the last logged step", DOWN),
    ("val/sync_acc_easy", "held-out sync accuracy during pretraining, easy negatives "
     "(another clip's audio); last validation", UP),
    ("val/sync_acc_hard", "held-out sync accuracy during pretraining, hard negatives "
     "(the same clip, a non-overlapping window); last validation", UP),
    ("sync/acc", "sync accuracy with easy negatives: the paper's headline figure "
     "(= sync/acc_easy)", UP),
    ("sync/acc_easy", "balanced sync accuracy on held-out clips (mean of the in-sync hit rate "
     "and the negative rejection rate) against easy negatives: another clip's audio; 0.5 is "
     "chance", UP),
    ("sync/acc_hard", "balanced sync accuracy against hard negatives: the same clip's audio "
     "from a non-overlapping window", UP),
    ("sync/acc_superhard", "balanced sync accuracy against super-hard negatives: the same "
     "clip, overlapping but shifted by at least data.min_shift", UP),
    ("sync/pair_acc_*", "share of pairs whose in-sync audio scores above the negative "
     "(no threshold)", UP),
    ("*/scratch/acc_video_mean", "the same fine-tuning from random initialisation: the "
     "baseline pretraining has to beat", UP),
    ("*/gain_over_scratch", "pretrained minus from-scratch video accuracy: what pretraining "
     "adds", UP),
    ("*/acc_video", "video-level accuracy after fine-tuning the pretrained video net "
     "(softmax averaged over clips; mean over splits)", UP),
    ("*/acc_clip", "clip-level accuracy after fine-tuning the pretrained video net", UP),
    ("multimodal/acc", "late fusion of fine-tuned video and frozen-audio class probabilities",
     UP),
    ("*/acc", "accuracy of a linear classifier on frozen pretrained audio features (mean over "
     "the official folds)", UP),
    ("*seconds", "wall time of the job", DOWN),
    ("*loss*", "a loss term", DOWN),
    ("*acc*", "an accuracy", UP),
)  # fmt: skip


def describe_metric(name: str) -> tuple[str, str]:
    """(meaning, better direction: 'higher' | 'lower' | '') of a metric name."""
    for pattern, meaning, direction in METRIC_DOCS:
        if fnmatch.fnmatchcase(name, pattern):
            return meaning, direction
    return "", ""
