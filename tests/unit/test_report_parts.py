"""Pieces of the comparison report with known answers: the t-interval, metric directions, the
MLflow UI link and configuration labels."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from avts_dist.stats import mean_ci
from report.groups import group_runs
from report.html import mlflow_run_url
from report.metric_docs import describe_metric


def test_mean_ci_by_hand():
    # [1, 2, 3]: mean 2, sample std 1, t(0.975, df=2) = 4.302653 -> 4.302653 / sqrt(3).
    ci = mean_ci([1.0, 2.0, 3.0])
    assert ci.mean == 2.0 and ci.n == 3
    assert ci.half_width == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert (ci.low, ci.high) == pytest.approx((2.0 - 2.484138, 2.0 + 2.484138), rel=1e-6)
    # Two values: t(0.975, 1) = 12.7062; non-finite values are dropped.
    ci = mean_ci([0.5, 0.7, float("nan")])
    assert ci.n == 2 and ci.half_width == pytest.approx(12.7062 * 0.141421 / math.sqrt(2), rel=1e-5)
    one = mean_ci([0.8])
    assert one.half_width is None and one.low is None and one.mean == 0.8
    with pytest.raises(ValueError):
        mean_ci([])


@pytest.mark.parametrize(
    ("metric", "better"),
    [
        ("loss", "lower"),
        ("train/loss", "lower"),
        ("val/sync_acc_hard", "higher"),
        ("sync/acc", "higher"),
        ("sync/acc_superhard", "higher"),
        ("ucf101/scratch/acc_video_mean", "higher"),
        ("synthetic/video/gain_over_scratch", "higher"),
        ("esc50/acc", "higher"),
        ("sync/seconds", "lower"),
        ("data/clips_per_s", ""),
    ],
)
def test_metric_directions(metric, better):
    meaning, direction = describe_metric(metric)
    assert direction == better
    assert bool(meaning) == bool(better)


def test_scratch_baseline_is_not_described_as_the_pretrained_figure():
    assert "random initialisation" in describe_metric("hmdb51/scratch/acc_video_mean")[0]
    assert "pretrained video net" in describe_metric("hmdb51/acc_video")[0]


def test_mlflow_run_url():
    assert (
        mlflow_run_url("http://mlflow:5000/", "7", "abc")
        == "http://mlflow:5000/#/experiments/7/runs/abc"
    )
    assert mlflow_run_url("https://x.org/mlflow", "1", "r").startswith("https://x.org/mlflow/#/")
    assert mlflow_run_url("file:///tmp/mlruns", "1", "r") is None
    assert mlflow_run_url("", "1", "r") is None


def _row(name: str, **params: str) -> dict:
    run = SimpleNamespace(data=SimpleNamespace(params=params, tags={}, metrics={}))
    return {"run": name, "_run": run, "_children": []}


def test_configurations_group_by_everything_but_seeds():
    rows = [
        _row(f"{arm}-s{seed}", **{"curriculum.enabled": on, "data.seed": str(seed),
             "loss.seed": str(seed), "run.dir": f"runs/{arm}-s{seed}", "data.fps": "8"})
        for arm, on in (("curriculum", "true"), ("no_curriculum", "false"))
        for seed in range(3)
    ]  # fmt: skip
    groups, seed_keys = group_runs(rows)
    assert seed_keys == ["data.seed", "loss.seed"]
    assert [g.label for g in groups] == ["curriculum", "no_curriculum"]
    assert [g.seeds for g in groups] == [["0", "1", "2"]] * 2  # equal seed keys shown once
    assert groups[0].params == {"curriculum.enabled": "true"}  # run.dir never splits

    # Names without a shared stem fall back to short key=value labels, then to letters.
    rows = [_row("a1", lr="0.1"), _row("b7", lr="0.2")]
    assert [g.label for g in group_runs(rows)[0]] == ["a1", "b7"]
    rows = [_row("x", lr="0.1", **{"data.seed": "0"}), _row("y", lr="0.1", **{"data.seed": "1"})]
    assert [g.label for g in group_runs(rows)[0]] == ["all runs"]
    long = "z" * 80
    rows = [_row(f"{p}-s{s}", cfg=p + long, **{"data.seed": str(s)}) for p in "ab" for s in (0, 1)]
    rows[2]["run"] = "a-s9"  # two configurations would share the name stem "a"
    assert [g.label for g in group_runs(rows)[0]] == ["config A", "config B"]
