"""Evaluation jobs: each runs alone (``avts eval <job> --checkpoint X [k=v ...]``) and logs to
MLflow as a child run of the pretraining run it evaluates.

=============  ==============================================  ================================
job            what                                            dataset (``eval.datasets.<job>``)
=============  ==============================================  ================================
sync           held-out sync accuracy (easy/hard/superhard,    default: ``data.url``, split
               accuracy vs offset)                              ``eval.sync_split``/``data.val_split``
ucf101         fine-tune video net (+ scratch), 3 splits       ``avts prepare ucf101`` output
hmdb51         same                                             ``avts prepare hmdb51`` output
esc50          frozen audio features + linear SVM, 5 folds     ``avts prepare esc50`` output
dcase2014      same, official folds                            ``avts prepare dcase2014`` output
multimodal     video fine-tune + audio logreg, late fusion     any labelled video dataset
synthetic      the synthetic corpus's labels: video fine-tune  default: ``data.url``
               (+ scratch) and audio linear probe
=============  ==============================================  ================================
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eval.common import EvalError, Pretrained, check_model_match, eval_params, load_pretrained

__all__ = ["JOBS", "EvalError", "EvalResult", "load_pretrained", "run_eval"]

JOBS = ("sync", "ucf101", "hmdb51", "esc50", "dcase2014", "multimodal", "synthetic")


@dataclass
class EvalResult:
    job: str
    metrics: dict[str, float]
    out_dir: str
    run_id: str = ""
    parent_run_id: str = ""
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def _dataset_url(job: str, cfg) -> str:
    url = cfg.eval.datasets.get(job, "")
    if url:
        return url
    if job in ("sync", "synthetic"):
        return cfg.data.url
    raise EvalError(f"no dataset for {job}: pass eval.datasets.{job}=<URL of avts prepare output>")


def _run_synthetic(job, cfg, pre, idx, out_dir, log):
    from eval.action import run_action
    from eval.audio import run_audio

    video = run_action(
        job,
        cfg,
        pre,
        idx,
        out_dir / "video",
        lambda m, step=0: log({f"video/{k}": v for k, v in m.items()}, step),
    )
    audio = run_audio(
        job,
        cfg,
        pre,
        idx,
        out_dir / "audio",
        lambda m, step=0: log({f"audio/{k}": v for k, v in m.items()}, step),
    )
    return {
        **{f"video/{k}": v for k, v in video.items()},
        **{f"audio/{k}": v for k, v in audio.items()},
    }


def _runner(job: str):
    if job == "sync":
        from eval.sync import run_sync

        return run_sync
    if job in ("ucf101", "hmdb51"):
        from eval.action import run_action

        return run_action
    if job in ("esc50", "dcase2014"):
        from eval.audio import run_audio

        return run_audio
    if job == "multimodal":
        from eval.multimodal import run_multimodal

        return run_multimodal
    if job == "synthetic":
        return _run_synthetic
    raise EvalError(f"unknown evaluation {job!r}; expected one of {', '.join(JOBS)}")


def run_eval(
    job: str, cfg, pre: Pretrained | None = None, *, explicit_model_keys: set[str] | None = None
) -> EvalResult:
    """Runs one job for ``cfg.eval.checkpoint`` (or ``pre``) and logs it as an MLflow child run."""
    import torch

    from avts_dist.data.index import DatasetError, DatasetIndex
    from avts_dist.tracking.eval_runs import EvalRun

    runner = _runner(job)
    pre = pre or load_pretrained(cfg.eval.checkpoint)
    check_model_match(pre, cfg, explicit_model_keys or set())
    url = _dataset_url(job, cfg)
    try:
        idx = DatasetIndex.load(url, storage_options=cfg.data.storage_options)
    except DatasetError as exc:
        raise EvalError(f"dataset for {job}: {exc}") from None
    base = Path(cfg.eval.out_dir) if cfg.eval.out_dir else ((pre.run_dir or Path("runs")) / "eval")
    out_dir = base / job
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.eval.seed)
    parent = cfg.eval.parent_run_id or pre.mlflow_run_id
    tracker = None
    if cfg.tracking.enabled:
        try:
            tracker = EvalRun(
                job,
                tracking_uri=cfg.tracking.uri,
                parent_run_id=parent,
                experiment=cfg.tracking.experiment,
                tags={"avts.checkpoint": pre.export_path, "avts.dataset": url},
            )
        except ValueError as exc:
            raise EvalError(str(exc)) from None
        tracker.log_params(eval_params(cfg, pre, url))

    def log(metrics: dict[str, float], step: int = 0) -> None:
        if tracker is not None:
            tracker.log_metrics({f"{job}/{k}": v for k, v in metrics.items()}, step=step)

    t0 = time.time()
    try:
        metrics = runner(job, cfg, pre, idx, out_dir, log)
    except BaseException as exc:
        if tracker is not None:
            tracker.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    seconds = time.time() - t0
    result = EvalResult(
        job, metrics, str(out_dir), tracker.run_id if tracker else "", parent, seconds
    )
    (out_dir / "metrics.json").write_text(
        json.dumps(
            {
                "job": job,
                "dataset": url,
                "checkpoint": pre.export_path,
                "seconds": seconds,
                "metrics": metrics,
            },
            indent=1,
            default=float,
        )
    )
    if tracker is not None:
        tracker.log_metrics({f"{job}/seconds": seconds})
        tracker.log_artifacts(out_dir)
        tracker.end("FINISHED")
    return result
