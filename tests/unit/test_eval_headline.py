"""What `avts eval` prints: a short headline table per job kind (report/headline.py) with 95%
intervals where the job has them, then where the full metrics went (avts_dist/cli/eval.py)."""

from __future__ import annotations

import statistics

import pytest

from avts_dist.cli.eval import summary_lines
from eval.run import EvalResult
from report.headline import format_headline, headline_rows


def _sync_metrics(num_clips: int, tpr: float = 0.75) -> dict[str, float]:
    m = {"tpr": tpr, "num_clips": num_clips, "acc": 0.0, "threshold": 0.5}
    for kind, reject in (("easy", 0.875), ("hard", 0.5), ("superhard", 0.25)):
        m[f"reject_{kind}"], m[f"num_{kind}"] = reject, num_clips
        m[f"acc_{kind}"] = 0.5 * (tpr + reject)
    return m


def test_sync_headline_three_accuracies_with_binomial_intervals():
    small, large = (headline_rows("sync", _sync_metrics(n)) for n in (16, 64))
    assert [r.label for r in small] == [
        f"sync accuracy, {k} negatives" for k in ("easy", "hard", "superhard")
    ]
    m = _sync_metrics(16)
    for row, kind in zip(small, ("easy", "hard", "superhard"), strict=True):
        assert row.value == m[f"acc_{kind}"] and 0 <= row.low < row.value < row.high <= 1
        assert row.over == "16 clips, 16 negatives"
    # Four times the clips: half the width (a binomial interval, not a made-up one).
    for a, b in zip(small, large, strict=True):
        assert (b.high - b.low) == pytest.approx((a.high - a.low) / 2)


def test_finetune_headline_pretrained_vs_scratch_over_splits():
    pre, scratch = [0.5, 0.6, 0.7], [0.3, 0.45, 0.4]
    m = {f"pretrained/split{k}/acc_video": v for k, v in enumerate(pre, 1)}
    m |= {f"scratch/split{k}/acc_video": v for k, v in enumerate(scratch, 1)}
    m |= {"acc_video": statistics.mean(pre), "pretrained/split1/acc_clip": 0.1}
    rows = {r.label: r for r in headline_rows("finetune", m)}
    assert list(rows) == [
        "video accuracy, pretrained", "video accuracy, scratch", "gain over scratch"
    ]  # fmt: skip
    assert rows["video accuracy, pretrained"].value == pytest.approx(statistics.mean(pre))
    assert rows["video accuracy, scratch"].value == pytest.approx(statistics.mean(scratch))
    gains = [p - s for p, s in zip(pre, scratch, strict=True)]
    assert rows["gain over scratch"].value == pytest.approx(statistics.mean(gains))
    for row in rows.values():
        assert row.over == "3 splits" and row.low < row.value < row.high
    # One split: a mean with no interval.
    one = headline_rows("finetune", {"pretrained/split2/acc_video": 0.5})
    assert len(one) == 1 and one[0].low is None and one[0].over == "1 split"


def test_probe_headline_mean_over_folds():
    folds = [1.0, 0.8, 0.9, 0.7, 0.85]
    m = {f"fold{k}/acc": v for k, v in enumerate(folds, 1)} | {"acc": 0.85, "num_folds": 5}
    (row,) = headline_rows("probe", m)
    assert row.label == "linear-probe accuracy" and row.over == "5 folds"
    assert row.value == pytest.approx(statistics.mean(folds)) and row.low < row.value < row.high


def test_printed_summary_is_a_short_table_then_where_the_metrics_went(tmp_path):
    m = _sync_metrics(16) | {f"extra/{i}": float(i) for i in range(30)}
    result = EvalResult(
        "sync", m, str(tmp_path), run_id="abc123", parent_run_id="par9", seconds=4.25,
        extra={"run_url": "http://mlflow:5000/#/experiments/1/runs/abc123", "model_id": "m-7"},
    )  # fmt: skip
    lines = summary_lines(result)
    assert lines[0] == "avts eval sync: 4.2 s"
    table = lines[1:-2]
    assert len(table) == 4 and table[0].split() == ["figure", "value", "95%", "interval", "over"]
    # Columns aligned: every row starts its value column at the same place.
    start = table[0].index("value")
    assert all(row[start - 2 : start] == "  " and row[start] != " " for row in table)
    assert lines[-2] == f"full metrics ({len(m)}): {tmp_path}/metrics.json"
    assert lines[-1].startswith("MLflow run abc123 (http://mlflow")
    assert "child of par9" in lines[-1] and "checkpoint model m-7" in lines[-1]
    assert max(len(line) for line in lines[:-2]) < 100
    no_tracking = summary_lines(EvalResult("esc50", {"fold1/acc": 1.0}, str(tmp_path)))
    assert no_tracking[-1] == f"full metrics (1): {tmp_path}/metrics.json"
    assert format_headline([]) == [format_headline([])[0]]


def test_synthetic_headline_video_finetune_and_audio_probe():
    m = {"video/pretrained/main/acc_video": 0.5, "video/scratch/main/acc_video": 0.75}
    m |= {"audio/main/acc": 1.0, "video/acc_video": 0.5}
    rows = headline_rows("synthetic", m)
    assert [(r.label, r.value) for r in rows] == [
        ("video accuracy, pretrained", 0.5), ("video accuracy, scratch", 0.75),
        ("gain over scratch", -0.25), ("audio linear-probe accuracy", 1.0),
    ]  # fmt: skip
    assert all(r.low is None for r in rows)  # one split, one fold: no interval


def test_lowlabel_headline_is_one_row_per_cell_over_fine_tuning_seeds():
    m = {
        "rhythm/probe/pretrained/k4/f0/acc": 0.5,
        "rhythm/probe/pretrained/k4/f1/acc": 0.7,
        "rhythm/probe/pretrained/k4/f2/acc": 0.6,
        "rhythm/probe/scratch/k4/f0/acc": 0.3,
        "rhythm/finetune/pretrained/kall/f0/acc": 0.4,
        "rhythm/finetune/pretrained/k8/f0/acc": 0.2,
    }
    rows = headline_rows("lowlabel", m)
    labels = [r.label for r in rows]
    # Sorted by recipe, then k as a number (8 before all), pretrained before scratch.
    assert labels == [
        "rhythm finetune, k=8, pretrained",
        "rhythm finetune, k=all, pretrained",
        "rhythm probe, k=4, pretrained",
        "rhythm probe, k=4, scratch",
    ]
    probe = rows[2]
    # Mean 0.6, t(0.975, df=2) = 4.3027 x sd 0.1 / sqrt(3), computed by hand.
    assert probe.value == pytest.approx(0.6)
    assert probe.high - probe.value == pytest.approx(4.3027 * 0.1 / 3**0.5, rel=1e-3)
    assert probe.over == "3 fine-tuning seeds" and rows[3].low is None
