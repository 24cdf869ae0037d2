"""One evaluation job, tracked: :func:`evaluate` is what ``avts eval`` and the SLURM evaluation
jobs (``launch/evaljobs.py``) call.

The job's runner gets only its own sub-config (``eval.sync``, ``eval.finetune``, ``eval.probe``)
plus explicit objects (weights, dataset index, runtime, output folder, metric sink); this module
is the one place that takes them out of the whole config.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from avts_dist.config import (
    Config,
    flatten_config,
    load_config,
    read_yaml_layers,
    resolve_config_path,
)
from avts_dist.data import DatasetError, DatasetIndex
from avts_dist.tracking.eval_runs import EvalRun, run_url
from eval.action import run_finetune
from eval.audio import run_probe
from eval.common import EvalRuntime, JobIO, MetricSink
from eval.lowlabel import run_lowlabel
from eval.multimodal import run_multimodal
from eval.pretrained import ARCH_FIELDS, Pretrained, check_model_match, resolve_pretrained
from eval.registry import EvalError, EvalSpec, dataset_url, get_job
from eval.splits import split_plans
from eval.sync import run_sync

__all__ = ["EvalResult", "evaluate", "run_eval"]


@dataclass
class EvalResult:
    job: str
    metrics: dict[str, float]
    out_dir: str
    run_id: str = ""
    parent_run_id: str = ""
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def explicit_model_keys(config: str | None, overrides: Iterable[str]) -> set[str]:
    """``model.*`` keys the user set (overrides, ``--config``): they must match the checkpoint."""
    keys = {o.split("=", 1)[0][len("model.") :] for o in overrides if o.startswith("model.")}
    if config:
        for layer in read_yaml_layers(resolve_config_path(config)):
            keys |= set((layer.get("model") or {}).keys())
    return keys


def evaluate(
    job: str,
    checkpoint: str,
    *,
    config: str | None = None,
    overrides: Iterable[str] = (),
    parent_run_id: str = "",
    tracking_uri: str | None = None,
    out_dir: str = "",
) -> EvalResult:
    """Runs evaluation ``job`` on ``checkpoint`` (exported ``.pt`` or checkpoint dir).

    The config is ``config`` if given, else the pretraining run's ``config.yaml`` (found above
    the checkpoint), else the defaults; ``overrides`` come last. Raises :class:`EvalError` or
    :class:`avts_dist.config.ConfigError` with one line.
    """
    get_job(job)
    pre = resolve_pretrained(checkpoint)
    overrides = list(overrides)
    if parent_run_id:
        overrides.append(f"eval.parent_run_id={parent_run_id}")
    if tracking_uri is not None:
        overrides.append(f"tracking.uri={tracking_uri}")
    if out_dir:
        overrides.append(f"eval.out_dir={out_dir}")
    overrides.append(f"eval.checkpoint={checkpoint}")
    base = config
    if base is None and pre.run_dir is not None and (pre.run_dir / "config.yaml").exists():
        base = str(pre.run_dir / "config.yaml")
    cfg = load_config(base, overrides)
    return run_eval(job, cfg, pre, explicit_model_keys=explicit_model_keys(config, overrides))


def eval_params(cfg: Config, pre: Pretrained, dataset: str) -> dict[str, Any]:
    """What the evaluation run records: its eval.* keys, data geometry, model architecture."""
    params = {
        k: v
        for k, v in flatten_config(cfg.eval, prefix="eval.").items()
        if not k.startswith(("eval.datasets", "eval.checkpoint"))
    }
    params.update(
        {
            f"data.{k}": getattr(cfg.data, k)
            for k in ("num_frames", "fps", "size", "sample_rate", "num_mel_bins")
        }
    )
    params.update({f"model.{k}": getattr(pre.model_cfg, k) for k in ARCH_FIELDS})
    params["checkpoint"] = pre.checkpoint
    params["dataset"] = dataset
    return params


def _run_job(
    spec: EvalSpec,
    cfg: Config,
    pre: Pretrained,
    idx: DatasetIndex,
    rt: EvalRuntime,
    out_dir: Path,
    log: MetricSink,
) -> dict[str, float]:
    ev, data = cfg.eval, cfg.data

    def plans(usable: np.ndarray):
        return split_plans(
            idx,
            splits=list(ev.splits),
            max_train=ev.max_train_videos,
            max_test=ev.max_test_videos,
            seed=ev.seed,
            usable=usable,
        )

    has_video, has_audio = idx.has_video.astype(bool), idx.has_audio.astype(bool)
    io = JobIO(idx, data, rt, out_dir, log, spec.name)
    if spec.kind == "sync":
        return run_sync(ev.sync, pre.model(), cfg.loss, io)
    if spec.kind == "finetune":
        return run_finetune(ev.finetune, pre, plans(has_video), io)
    if spec.kind == "probe":
        return run_probe(ev.probe, pre.audio_net(), plans(has_audio), io)
    if spec.kind == "multimodal":
        return run_multimodal(ev.finetune, ev.probe, pre, plans(has_video), io)
    if spec.kind == "synthetic":
        video = run_finetune(ev.finetune, pre, plans(has_video), io.part("video"))
        audio = run_probe(ev.probe, pre.audio_net(), plans(has_audio), io.part("audio"))
        return {
            **{f"video/{k}": v for k, v in video.items()},
            **{f"audio/{k}": v for k, v in audio.items()},
        }
    if spec.kind == "lowlabel":
        return run_lowlabel(ev.lowlabel, pre, plans(has_video), io)
    raise AssertionError(f"evaluation kind {spec.kind!r} has no runner")


def run_eval(
    job: str,
    cfg: Config,
    pre: Pretrained | None = None,
    *,
    explicit_model_keys: set[str] | None = None,
) -> EvalResult:
    """Runs one job for ``cfg.eval.checkpoint`` (or ``pre``) and logs it as an MLflow child run."""
    spec = get_job(job)
    pre = pre or resolve_pretrained(cfg.eval.checkpoint)
    check_model_match(pre, cfg, explicit_model_keys or set())
    if spec.kind in ("sync", "probe", "multimodal", "synthetic"):
        pre.require_audio(job)  # before any run is opened: a video-only export has no audio net
    url = dataset_url(spec, dict(cfg.eval.datasets), cfg.data.url)
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
                tags={
                    **cfg.tracking.tags,
                    "avts.checkpoint": pre.checkpoint,
                    "avts.dataset": url,
                },
                checkpoint_step=pre.payload.get("step"),
            )
        except ValueError as exc:
            raise EvalError(str(exc)) from None
        tracker.log_params(eval_params(cfg, pre, url))

    def log(metrics: dict[str, float], step: int = 0) -> None:
        if tracker is not None:
            tracker.log_metrics({f"{job}/{k}": v for k, v in metrics.items()}, step=step)

    t0 = time.time()
    try:
        metrics = _run_job(spec, cfg, pre, idx, EvalRuntime.from_config(cfg.eval), out_dir, log)
    except BaseException as exc:
        if tracker is not None:
            tracker.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    seconds = time.time() - t0
    result = EvalResult(
        job, metrics, str(out_dir), tracker.run_id if tracker else "", parent, seconds
    )
    if tracker is not None:
        result.extra.update(
            run_url=run_url(tracker.tracking_uri, tracker.experiment_id, tracker.run_id),
            model_id=tracker.model_id,
        )
    (out_dir / "metrics.json").write_text(
        json.dumps(
            {
                "job": job,
                "dataset": url,
                "checkpoint": pre.checkpoint,
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
