"""The low-label job's pieces (eval/lowlabel.py): k-shot sets, cell names, its config section,
the fixed-step sampler and the probe's scoring. The job end to end: tests/integration/
test_lowlabel.py."""

from __future__ import annotations

import numpy as np
import pytest

from avts_dist.config import ConfigError, LowLabelConfig, load_config
from eval.lowlabel import (
    StepClips,
    cell_metric,
    check_pool,
    kshot_rows,
    probe_accuracy,
    shot_name,
)
from eval.registry import EvalError

# 60 rows: 3 classes; rows 0-44 the labelled pool (15 per class), 45-59 the test set.
LABELS = np.arange(60) % 3
POOL = np.arange(45)
TEST = np.arange(45, 60)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kshot_sets_are_nested_balanced_and_from_the_pool(seed):
    previous = np.array([], dtype=np.int64)
    for k in (1, 2, 4, 8):
        rows = kshot_rows(LABELS, POOL, k, seed)
        assert np.bincount(LABELS[rows], minlength=3).tolist() == [k, k, k]
        assert set(previous.tolist()) <= set(rows.tolist()), f"k={k} does not hold the smaller set"
        assert set(rows.tolist()) <= set(POOL.tolist())
        assert not set(rows.tolist()) & set(TEST.tolist())
        previous = rows
    assert kshot_rows(LABELS, POOL, 0, seed).tolist() == POOL.tolist()


def test_kshot_sets_depend_on_the_seed_and_class_only():
    draws = {tuple(kshot_rows(LABELS, POOL, 4, f).tolist()) for f in range(3)}
    assert len(draws) == 3
    # A class's picks do not move when another class's pool changes (every arm, same draw).
    fewer = POOL[~((LABELS[POOL] == 2) & (POOL > 30))]
    a, b = kshot_rows(LABELS, POOL, 4, 1), kshot_rows(LABELS, fewer, 4, 1)
    assert a[LABELS[a] == 0].tolist() == b[LABELS[b] == 0].tolist()
    # The draw is numpy's default_rng([f, class]) permutation of the class's pool rows.
    class1 = POOL[LABELS[POOL] == 1]
    expected = np.random.default_rng([1, 1]).permutation(class1)[:4]
    assert sorted(expected.tolist()) == a[LABELS[a] == 1].tolist()


def test_pool_too_small_for_k_is_one_clear_error():
    with pytest.raises(EvalError, match=r"needs 8 eval_train clips per class; c has 5"):
        pool = np.r_[POOL[LABELS[POOL] != 2], [2, 5, 8, 11, 14]]
        check_pool(LABELS, pool, [1, 8], ["a", "b", "c"])
    check_pool(LABELS, POOL, [1, 2, 4, 8, 0], ["a", "b", "c"])


def test_cell_metric_names():
    assert (
        cell_metric("rhythm", "finetune", "pretrained", 1, 0)
        == "rhythm/finetune/pretrained/k1/f0/acc"
    )
    assert (
        cell_metric("appearance", "probe", "scratch", 0, 2)
        == "appearance/probe/scratch/kall/f2/acc"
    )
    assert shot_name(8) == "8"


def test_config_defaults_are_the_protocol_and_bad_keys_name_themselves():
    cfg = load_config(None, ["eval.lowlabel.shots=[1,0]", "eval.lowlabel.scratch=true"]).eval
    assert cfg.lowlabel.shots == [1, 0] and cfg.lowlabel.scratch
    d = LowLabelConfig()
    assert (d.shots, d.seeds, d.recipes, d.label_set) == (
        [1, 2, 4, 8, 0],
        [0, 1, 2],
        ["finetune", "probe"],
        "rhythm",
    )
    assert (d.steps, d.lr, d.weight_decay, d.dropout, d.c) == (60, 3e-3, 1e-4, 0.5, 1.0)
    assert (d.probe_windows, d.test_windows) == (4, 3)
    recipes = ["finetune", "multimodal", "silent_audio"]
    assert (
        load_config(None, [f"eval.lowlabel.recipes=[{','.join(recipes)}]"]).eval.lowlabel.recipes
        == recipes
    )
    with pytest.raises(ConfigError, match=r"eval\.lowlabel\.recipes"):
        load_config(None, ["eval.lowlabel.recipes=[linear]"])
    with pytest.raises(ConfigError, match=r"eval\.lowlabel\.shots"):
        load_config(None, ["eval.lowlabel.shots=[1,1]"])
    with pytest.raises(ConfigError, match=r"eval\.lowlabel\.steps"):
        load_config(None, ["eval.lowlabel.steps=0"])


class _Clips:
    """Stands in for VideoClips (decoding is tested elsewhere): an item says which pass and clip."""

    epoch = 0

    def __len__(self) -> int:
        return 3

    def __getitem__(self, pos: int):
        return self.epoch, pos


def test_step_clips_give_every_step_a_full_batch_cycling_through_the_set():
    clips = StepClips(_Clips(), num_items=8 * 5, seed=0)
    items = [clips[i] for i in range(len(clips))]
    assert len(items) == 40
    for e in range(13):  # every full pass is a permutation of the 3 clips, with its own windows
        assert sorted(pos for ep, pos in items if ep == e) == [0, 1, 2]
    assert [ep for ep, _ in items] == sorted(ep for ep, _ in items)
    orders = {tuple(pos for ep, pos in items if ep == e) for e in range(13)}
    assert len(orders) > 1
    assert [clips[i] for i in range(40)] == [StepClips(_Clips(), 40, seed=0)[i] for i in range(40)]


def test_probe_scores_clips_by_their_mean_window_probability():
    rng = np.random.default_rng(0)
    centres = np.eye(3) * 4
    train_y = np.repeat(np.arange(3), 4)
    train_x = centres[train_y] + rng.normal(0, 0.3, (12, 3))
    test_y = np.array([0, 1, 2, 2])
    test_x = centres[test_y][:, None, :] + rng.normal(0, 0.3, (4, 3, 3))
    assert probe_accuracy(train_x, train_y, test_x, test_y, 3, 1.0, 0) == 1.0
    # One of three windows of clip 0 looks like class 1: the mean still says class 0.
    test_x[0, 1] = centres[1]
    assert probe_accuracy(train_x, train_y, test_x, test_y, 3, 1.0, 0) == 1.0
    # Two of three windows say class 1: the clip is now wrong, 3 of 4 right.
    test_x[0, 2] = centres[1]
    assert probe_accuracy(train_x, train_y, test_x, test_y, 3, 1.0, 0) == 0.75


@pytest.mark.parametrize("arch", ["two_stream", "early_fusion"])
def test_classifiers_of_each_recipe_read_the_inputs_they_should(arch):
    import torch

    from avts_dist.export import export_payload
    from avts_dist.models import build_model
    from eval.lowlabel import build_classifier
    from eval.pretrained import Pretrained

    tiny = ["model.video_width=8", "model.video_layers=[1,1,1,1]", "model.audio_arch=tiny"]
    cfg = load_config(None, [*tiny, "model.audio_width=8", f"model.arch={arch}"]).model
    torch.manual_seed(123)  # not the scratch seed (0): "pretrained" weights differ from scratch
    pre = Pretrained("mem", export_payload(build_model(cfg), cfg), cfg, None, "")
    video = torch.randn(2, 3, 8, 32, 32)
    mel, other_mel = torch.randn(2, 1, 40, 100), torch.randn(2, 1, 40, 100)

    def logits(recipe, init="pretrained", head_seed=0, audio=mel):
        net = build_classifier(recipe, pre, 3, 0.5, init=init, seed=0, head_seed=head_seed).eval()
        with torch.no_grad():
            return net(video) if recipe == "finetune" else net(video, audio)

    assert logits("finetune").shape == (2, 3)
    # Both modalities: another audio gives other logits.
    assert not torch.allclose(logits("multimodal"), logits("multimodal", audio=other_mel))
    # The same nets and head seed give the same classifier; the head follows its own seed.
    assert torch.equal(logits("multimodal"), logits("multimodal"))
    assert not torch.equal(logits("multimodal"), logits("multimodal", head_seed=1))
    assert not torch.equal(logits("finetune"), logits("finetune", init="scratch"))
    if arch == "early_fusion":
        # Fed silence: the audio given does not matter.
        assert torch.equal(logits("silent_audio"), logits("silent_audio", audio=other_mel))
