"""Split plans on hand-built dataset indexes: each plan's train and test rows are known here."""

from __future__ import annotations

import numpy as np
import pytest

from avts_dist.data import DatasetIndex
from eval.registry import EvalError
from eval.splits import split_plans


def make_index(split: list[str], status: list[str] | None = None, **extra: list) -> DatasetIndex:
    """A real DatasetIndex over no media: only the columns split plans read are meaningful."""
    n = len(split)
    status = status or ["ok"] * n
    splits, statuses = sorted(set(split)), sorted(set(status))
    columns = {
        "key": np.array([f"clip{i}".encode() for i in range(n)]),
        "shard": np.zeros(n, np.int32),
        "offset": np.zeros((n, 1), np.int64),
        "size": np.zeros((n, 1), np.int64),
        "label": np.zeros(n, np.int32),
        "split": np.array([splits.index(s) for s in split], np.int8),
        "duration": np.full(n, 4.0, np.float32),
        "fps": np.full(n, 8.0, np.float32),
        "num_frames": np.full(n, 32, np.int32),
        "has_video": np.ones(n, np.bool_),
        "has_audio": np.ones(n, np.bool_),
        "sample_rate": np.full(n, 16000, np.int32),
        "status": np.array([statuses.index(s) for s in status], np.int8),
    }
    kinds = {}
    for name, values in extra.items():
        if isinstance(values[0], str):
            columns[f"x_{name}"] = np.array([v.encode() for v in values])
            kinds[name] = "str"
        else:
            columns[f"x_{name}"] = np.array(values, np.int64)
            kinds[name] = "int"
    header = {
        "classes": ["a"],
        "shards": ["shard-000000.tar"],
        "splits": splits,
        "statuses": statuses,
        "members": ["mp4"],
        "extra_columns": kinds,
    }
    return DatasetIndex(columns, header, "memory://toy")


def _rows(plan) -> tuple[list[int], list[int]]:
    return plan.train_rows.tolist(), plan.test_rows.tolist()


def test_ucf_style_split_columns_pick_exactly_their_rows():
    idx = make_index(
        ["train"] * 6,
        status=["ok", "ok", "ok", "ok", "ok", "corrupt"],
        split1=["train", "train", "test", "test", "unused", "train"],
        split2=["test", "train", "train", "unused", "test", "test"],
        split3=["train", "test", "unused", "train", "test", "train"],
    )
    plans = split_plans(idx, splits=[1, 2, 3])
    assert [p.name for p in plans] == ["split1", "split2", "split3"]
    # Row 5 is corrupt: in no plan. "unused" rows are in neither side.
    assert _rows(plans[0]) == ([0, 1], [2, 3])
    assert _rows(plans[1]) == ([1, 2], [0, 4])
    assert _rows(plans[2]) == ([0, 3], [1, 4])
    only2 = split_plans(idx, splits=[2])
    assert [p.name for p in only2] == ["split2"] and _rows(only2[0]) == ([1, 2], [0, 4])
    usable = np.array([True, False, True, True, True, True])
    assert _rows(split_plans(idx, splits=[2], usable=usable)[0]) == ([2], [0, 4])


def test_dcase_style_fold_columns_in_numeric_order():
    folds = {f"fold{k}": ["train"] * 12 for k in range(1, 12)}
    for k in range(1, 12):
        folds[f"fold{k}"][k] = "test"
    plans = split_plans(make_index(["train"] * 12, **folds), splits=[1])
    assert [p.name for p in plans] == [f"fold{k}" for k in range(1, 12)]
    assert [p.test_rows.tolist() for p in plans] == [[k] for k in range(1, 12)]
    assert 0 in plans[9].train_rows and 10 not in plans[9].train_rows


def test_esc_style_fold_column_leaves_one_fold_out():
    idx = make_index(["train"] * 7, fold=[1, 2, 3, 1, 2, 3, 2])
    plans = split_plans(idx, splits=[1, 2, 3])
    assert [p.name for p in plans] == ["fold1", "fold2", "fold3"]
    assert _rows(plans[0]) == ([1, 2, 4, 5, 6], [0, 3])
    assert _rows(plans[1]) == ([0, 2, 3, 5], [1, 4, 6])
    assert _rows(plans[2]) == ([0, 1, 3, 4, 6], [2, 5])


def test_index_split_train_against_test_else_val():
    idx = make_index(["train", "val", "test", "train", "test"])
    assert [(p.name, *_rows(p)) for p in split_plans(idx, splits=[1])] == [("main", [0, 3], [2, 4])]
    no_test = make_index(["train", "val", "val", "train"])
    assert _rows(split_plans(no_test, splits=[1])[0]) == ([0, 3], [1, 2])


def test_caps_draw_a_seeded_sorted_subset():
    idx = make_index(["train"] * 8 + ["test"] * 4)
    plan = split_plans(idx, splits=[1], max_train=3, max_test=2, seed=5)[0]
    assert plan.train_rows.size == 3 and plan.test_rows.size == 2
    assert set(plan.train_rows) <= set(range(8)) and set(plan.test_rows) <= {8, 9, 10, 11}
    assert plan.train_rows.tolist() == sorted(plan.train_rows.tolist())
    again = split_plans(idx, splits=[1], max_train=3, max_test=2, seed=5)[0]
    assert _rows(again) == _rows(plan)


def test_an_empty_side_is_an_error_naming_the_plan():
    idx = make_index(["train"] * 3, split1=["train", "train", "unused"])
    with pytest.raises(EvalError, match="split1 has 2 train and 0 test clips"):
        split_plans(idx, splits=[1])
