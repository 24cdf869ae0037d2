"""The one list of evaluation jobs: what each runs, where its data comes from, how it launches.

``avts eval`` (its choices), :func:`eval.run.run_eval` (dispatch) and ``avts launch`` (suites, job
arrays) all read :data:`JOBS`. This module imports nothing heavy: ``avts --help`` builds every
subcommand's parser, and torch/scikit-learn would add seconds to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["JOBS", "EvalError", "EvalSpec", "dataset_url", "get_job", "parse_suite"]

# sync: eval/sync.py; finetune: eval/action.py; probe: eval/audio.py; multimodal:
# eval/multimodal.py; synthetic: finetune + probe on the synthetic corpus's labels; lowlabel:
# eval/lowlabel.py (the study's k-shot protocol).
EvalKind = Literal["sync", "finetune", "probe", "multimodal", "synthetic", "lowlabel"]


class EvalError(ValueError):
    """A user-facing evaluation problem (bad checkpoint, dataset, split, job name); one line."""


@dataclass(frozen=True)
class EvalSpec:
    name: str
    kind: EvalKind
    summary: str
    # True: without eval.datasets.<name> the job reads data.url (the pretraining corpus).
    defaults_to_data_url: bool = False
    # True: its splits are independent fine-tuning runs, launched as one array task per split.
    array_over_splits: bool = False


JOBS: dict[str, EvalSpec] = {
    spec.name: spec
    for spec in (
        EvalSpec(
            "sync",
            "sync",
            "held-out sync accuracy: easy/hard/super-hard negatives, accuracy vs offset, "
            "offset classification",
            defaults_to_data_url=True,
        ),
        EvalSpec(
            "ucf101",
            "finetune",
            "fine-tune the video net (+ scratch baseline), 3 splits",
            array_over_splits=True,
        ),
        EvalSpec(
            "hmdb51",
            "finetune",
            "fine-tune the video net (+ scratch baseline), 3 splits",
            array_over_splits=True,
        ),
        EvalSpec("esc50", "probe", "frozen audio features + linear classifier, 5 folds"),
        EvalSpec("dcase2014", "probe", "frozen audio features + linear classifier, official folds"),
        EvalSpec(
            "multimodal",
            "multimodal",
            "video fine-tune + audio logistic regression, late fusion",
            array_over_splits=True,
        ),
        EvalSpec(
            "synthetic",
            "synthetic",
            "the synthetic corpus's labels: video fine-tune (+ scratch) and audio probe",
            defaults_to_data_url=True,
        ),
        EvalSpec(
            "lowlabel",
            "lowlabel",
            "k labelled clips per class (eval_train -> eval_test): fine-tune and linear probe",
            defaults_to_data_url=True,
        ),
    )
}


def get_job(name: str) -> EvalSpec:
    if name not in JOBS:
        raise EvalError(f"unknown evaluation {name!r}; expected one of {', '.join(JOBS)}")
    return JOBS[name]


def parse_suite(text: str | list[str]) -> list[str]:
    """``"sync, ucf101"`` -> ``["sync", "ucf101"]``; unknown or no names are an EvalError."""
    names = text if isinstance(text, list) else [s.strip() for s in text.split(",")]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in JOBS]
    if unknown:
        raise EvalError(f"unknown evaluation(s) {unknown}; known: {', '.join(JOBS)}")
    if not names:
        raise EvalError("no evaluation named")
    return names


def dataset_url(spec: EvalSpec, datasets: dict[str, str], data_url: str) -> str:
    """``eval.datasets.<name>``, else ``data.url`` for the jobs that default to it."""
    unknown = sorted(set(datasets) - set(JOBS))
    if unknown:
        raise EvalError(f"eval.datasets: unknown evaluation(s) {unknown}; known: {', '.join(JOBS)}")
    url = datasets.get(spec.name, "")
    if url:
        return url
    if spec.defaults_to_data_url:
        return data_url
    raise EvalError(
        f"no dataset for {spec.name}: pass eval.datasets.{spec.name}=<URL of avts prepare output>"
    )
