"""Split plans: which index rows train and which test, per official split or fold.

- ``split1..3`` columns (UCF101/HMDB51: ``train``/``test``/``unused``): one plan per chosen split;
- ``fold<k>`` columns (DCASE2014: ``train``/``test``/``unused``): one plan per column;
- a ``fold`` column (ESC-50): leave one fold out, one plan per fold value;
- else the index ``split``: ``train`` against ``test`` (or ``val`` when there is no test split).

Only rows with ``status=ok`` (and ``usable``, when given) take part.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from avts_dist.data import DatasetIndex
from eval.registry import EvalError

__all__ = ["SplitPlan", "split_plans"]


@dataclass
class SplitPlan:
    name: str
    train_rows: np.ndarray
    test_rows: np.ndarray


def _cap(rows: np.ndarray, n: int, seed: int) -> np.ndarray:
    """At most ``n`` rows (0: all), drawn without replacement and kept in index order."""
    if n and rows.size > n:
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(rows, size=n, replace=False))
    return rows


def _fold_columns(columns: set[str]) -> list[str]:
    return sorted((c for c in columns if c.startswith("fold") and c[4:].isdigit()), key=_fold_no)


def _fold_no(column: str) -> int:
    return int(column[4:])


def split_plans(
    idx: DatasetIndex,
    *,
    splits: list[int],
    max_train: int = 0,
    max_test: int = 0,
    seed: int = 0,
    usable: np.ndarray | None = None,
) -> list[SplitPlan]:
    """The plans of ``idx`` (a :class:`DatasetIndex`); ``splits`` picks UCF101/HMDB51 splits,
    ``max_train``/``max_test`` cap each plan's rows (0: no cap)."""
    ok = np.zeros(len(idx), dtype=bool)
    ok[idx.rows(status="ok")] = True
    if usable is not None:
        ok &= usable
    cols = set(idx.extra_columns)
    plans: list[SplitPlan] = []

    def add(name: str, train: np.ndarray, test: np.ndarray) -> None:
        plans.append(
            SplitPlan(
                name,
                _cap(np.flatnonzero(train & ok), max_train, seed),
                _cap(np.flatnonzero(test & ok), max_test, seed),
            )
        )

    if {f"split{k}" for k in splits} <= cols:
        for k in splits:
            col = idx.column(f"split{k}")
            add(f"split{k}", col == "train", col == "test")
    elif _fold_columns(cols):
        for c in _fold_columns(cols):
            col = idx.column(c)
            add(c, col == "train", col == "test")
    elif "fold" in cols:
        fold = idx.column("fold")
        for f in sorted(set(fold.tolist())):
            add(f"fold{f}", fold != f, fold == f)
    else:
        split = idx.split
        test_name = "test" if "test" in idx.splits else "val"
        if "eval_train" in idx.splits:  # the synthetic corpus's labelled pool, never pretrained on
            add("main", split == "eval_train", split == "eval_test")
        else:
            add("main", split == "train", split == test_name)
    for plan in plans:
        if plan.train_rows.size == 0 or plan.test_rows.size == 0:
            raise EvalError(
                f"{idx.url}: {plan.name} has {plan.train_rows.size} train and "
                f"{plan.test_rows.size} test clips with status ok; both must be > 0"
            )
    return plans
