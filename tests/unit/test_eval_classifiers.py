"""Linear probes, clip-to-video accuracy and late fusion on hand-built features and
probabilities, with answers worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from avts_dist.config import LinearProbeConfig, load_config
from eval.action import video_accuracy
from eval.audio import probe_folds
from eval.common import EvalRuntime, confusion
from eval.multimodal import late_fusion
from eval.splits import SplitPlan

CENTRES = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])


def _features(labels: list[int], seed: int = 0) -> np.ndarray:
    """One tight cluster per class (spread 0.1 around centres 10 apart): linearly separable."""
    rng = np.random.default_rng(seed)
    return CENTRES[labels] + 0.1 * rng.standard_normal((len(labels), 2))


@pytest.mark.parametrize("classifier", ["svm", "logreg"])
def test_probe_folds_known_answer(classifier):
    labels = np.array([0, 1, 2] * 4)
    feats = _features(labels.tolist())
    # Row 11 (class 2) sits in class 0's cluster: whatever is trained, it is predicted class 0.
    feats[11] = CENTRES[0]
    plans = [
        SplitPlan("fold1", np.arange(0, 9), np.arange(9, 12)),
        SplitPlan("fold2", np.arange(3, 12), np.arange(0, 3)),
    ]
    folds = probe_folds(feats, labels, plans, LinearProbeConfig(classifier=classifier, c=1.0))
    assert [f.name for f in folds] == ["fold1", "fold2"]
    assert folds[0].y_true.tolist() == [0, 1, 2] and folds[0].y_pred.tolist() == [0, 1, 0]
    assert folds[0].acc == pytest.approx(2 / 3)
    assert folds[1].acc == 1.0


def test_video_accuracy_averages_clips_per_video():
    # Video 0 (label 1): clips say 1 (0.6) and 0 (0.9) -> mean favours 0: video wrong.
    # Video 1 (label 0): clips say 0 and 0 -> right. Clips right: 1 of 2, then 2 of 2.
    probs = np.array([[0.4, 0.6], [0.9, 0.1], [0.7, 0.3], [0.8, 0.2]])
    acc_clip, acc_video, video_probs = video_accuracy(
        probs, np.array([0, 0, 1, 1]), np.array([1, 0])
    )
    assert acc_clip == pytest.approx(0.75)
    assert acc_video == pytest.approx(0.5)
    np.testing.assert_allclose(video_probs, [[0.65, 0.35], [0.75, 0.25]])


def test_late_fusion_uses_video_alone_without_audio():
    video = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    audio = np.array([[0.0, 1.0], [0.2, 0.8]])  # clips 0 and 2 have audio
    fused = late_fusion(video, audio, np.array([True, False, True]))
    np.testing.assert_allclose(fused, [[0.4, 0.6], [0.3, 0.7], [0.4, 0.6]])
    assert video.tolist() == [[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]], "inputs are left alone"


def test_confusion_rows_are_true_classes():
    cm = confusion(np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 0, 2]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_runtime_from_config():
    rt = EvalRuntime.from_config(load_config(None, ["eval.device=cpu", "eval.seed=4"]).eval)
    assert (rt.device.type, rt.seed, rt.batch_size) == ("cpu", 4, 16)
