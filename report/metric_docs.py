"""What each metric of the comparison means and which direction is better.

One table of glob patterns (first match wins), used by the report's legend and table arrows and
open to any other display of the same metrics (e.g. an evaluation's headline table).
"""

from __future__ import annotations

import fnmatch
import re

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
    ("sync/acc_offset_*", "balanced sync accuracy against the same clip's audio shifted by the "
     "offset in the name", UP),
    ("sync/acc_vs_offset", "balanced sync accuracy against audio shifted by an offset (step = "
     "offset in ms)", UP),
    ("sync/offset_acc", "offset classification, zero-shot: share of clips whose best-scoring "
     "audio shift of the grid (eval.sync.offset_grid_max, offset_grid_step) is the true "
     "offset; chance is one over the number of classes", UP),
    ("sync/offset_acc_within1", "offset classification within one class: the best-scoring "
     "shift is the true offset or a neighbour on the grid", UP),
    ("sync/offset_acc_by_offset", "offset classification accuracy at one true offset (step = "
     "offset in ms)", UP),
    ("sync/offset_acc_within1_by_offset", "offset classification accuracy within one class at "
     "one true offset (step = offset in ms)", UP),
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


# `avts eval lowlabel`'s cells: lowlabel/<label set>/<recipe>/<init>/k<k>/f<f>/acc, described
# from the name's parts (a glob cannot say which labels and which recipe).
_LOWLABEL_CELL = re.compile(r"lowlabel/([^/]+)/([^/]+)/([^/]+)/k([^/]+)/f(\d+)/acc")
_LOWLABEL_RECIPES = {
    "finetune": "fine-tuning the video net with a new linear head",
    "probe": "a linear probe (logistic regression) on the frozen video net's pooled features",
    "multimodal": "fine-tuning video and audio together (early fusion's classifier, or a head "
    "on both nets' features)",
    "silent_audio": "fine-tuning the early-fusion net fed silence as audio (video-only use)",
}
_LOWLABEL_INITS = {
    "pretrained": "from the pretrained weights",
    "scratch": "from random initialisation (the scratch baseline)",
}


def _lowlabel_meaning(name: str) -> str:
    m = _LOWLABEL_CELL.fullmatch(name)
    if not m or m[2] not in _LOWLABEL_RECIPES or m[3] not in _LOWLABEL_INITS:
        return ""
    shots = "every eval_train clip" if m[4] == "all" else f"k = {m[4]} clips per class"
    return (
        f"test accuracy on the {m[1]} labels (eval_test) after {_LOWLABEL_RECIPES[m[2]]}, "
        f"{_LOWLABEL_INITS[m[3]]}; trained on {shots}, seed f = {m[5]} (draw and training)"
    )


def describe_metric(name: str) -> tuple[str, str]:
    """(meaning, better direction: 'higher' | 'lower' | '') of a metric name."""
    meaning = _lowlabel_meaning(name)
    if meaning:
        return meaning, UP
    for pattern, meaning, direction in METRIC_DOCS:
        if fnmatch.fnmatchcase(name, pattern):
            return meaning, direction
    return "", ""
