"""The report's legend says what each metric measures: every description is checked against what
its name says (the job family, and for the low-label cells the label set, recipe and init), on the
names the jobs themselves produce."""

from __future__ import annotations

import pytest
import torch

from avts_dist.config import LOWLABEL_RECIPES
from avts_dist.data.synthetic import LABEL_SETS
from eval.lowlabel import INITS, cell_metric
from eval.sync import offset_classification, offset_name, sync_metrics
from report.metric_docs import UP, describe_metric

# What each recipe's description must name, and what it must not claim.
RECIPE_WORDS = {
    "finetune": ("fine-tuning the video net", "linear probe"),
    "probe": ("linear probe", "fine-tuning"),
    "multimodal": ("video and audio together", "linear probe"),
    "silent_audio": ("silence as audio", "linear probe"),
}
INIT_WORDS = {"pretrained": "pretrained weights", "scratch": "random initialisation"}


@pytest.mark.parametrize("label_set", LABEL_SETS)
@pytest.mark.parametrize("recipe", LOWLABEL_RECIPES)
@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("k", [1, 0])
def test_every_lowlabel_cell_is_described_by_its_name(label_set, recipe, init, k):
    name = f"lowlabel/{cell_metric(label_set, recipe, init, k, 2)}"
    meaning, better = describe_metric(name)
    assert better == UP
    must, must_not = RECIPE_WORDS[recipe]
    assert f"on the {label_set} labels" in meaning
    assert must in meaning and must_not not in meaning
    assert INIT_WORDS[init] in meaning
    assert ("every eval_train clip" if k == 0 else "k = 1 clips per class") in meaning
    assert "seed f = 2" in meaning
    # The old legend called every one of these an audio probe.
    assert "frozen pretrained audio features" not in meaning


def test_sync_metrics_are_described_as_sync():
    """The names sync_metrics and offset_classification really produce, with the job prefix."""
    pos = torch.tensor([0.9, 0.8])
    neg = {"easy": torch.tensor([0.1, 0.2]), offset_name(0.5): torch.tensor([0.3])}
    clips = {"easy": torch.tensor([0, 1]), offset_name(0.5): torch.tensor([1])}
    names = list(sync_metrics(pos, neg, clips, cut=0.5))
    grid = [-0.1, 0.0, 0.1]
    names += list(offset_classification(torch.eye(3)[None], grid).metrics)
    names += ["acc_vs_offset", "offset_acc_by_offset"]
    for name in (f"sync/{n}" for n in names if "acc" in n):
        meaning, better = describe_metric(name)
        assert better == UP, name
        assert "sync" in meaning or "offset" in meaning, (name, meaning)
    assert "within one class" in describe_metric("sync/offset_acc_within1")[0]
    assert "shifted by the offset" in describe_metric(f"sync/acc_{offset_name(0.5)}")[0]


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("esc50/acc", "frozen pretrained audio features"),
        ("dcase2014/fold2/acc", "frozen pretrained audio features"),
        ("ucf101/acc_video", "fine-tuning the pretrained video net"),
        ("hmdb51/scratch/acc_video_mean", "random initialisation"),
        ("multimodal/acc", "late fusion"),
    ],
)
def test_other_families_keep_their_descriptions(name, words):
    assert words in describe_metric(name)[0]
