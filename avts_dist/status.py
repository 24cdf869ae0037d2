"""How a pretraining run is doing, read from the files its trainer writes (``avts status``).

A run directory (local path or fsspec URL such as ``s3://bucket/runs/quickstart``) holds:

- ``config.yaml``: the resolved config (total steps, curriculum stages, checkpoint dir, MLflow);
- ``metrics.jsonl``: one strict-JSON line per optimizer step (``step``, ``epoch``, ``loss``,
  ``lr``, ``samples_seen``; at log steps ``train/*``, ``data/*``; ``val/*`` after validation;
  ``curriculum`` events and ``curriculum/stage_index`` at a stage change);
- ``checkpoints/<tag>/COMPLETE``: the newest complete checkpoint (``checkpoint.dir`` when the
  config puts it elsewhere);
- ``mlflow_run_id``: the MLflow run, whose status is asked when the store is reachable.

Nothing is written and no training process is contacted, so the same call works while the run
is live (a half-written last line is skipped) and after it has ended.

Figures the trainer does not write are derived, and :attr:`RunStatus.notes` says how:
total steps from the config plus the dataset index (the loader's own ``steps_per_epoch``), the
rate from ``train/step_s`` (compute + data wait per step) unless the lines carry a ``time``.
"""

from __future__ import annotations

import dataclasses
import json
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import yaml

from avts_dist.config import Config, ConfigError, config_from_dict
from avts_dist.storage import StorageError, get_fs, join
from avts_dist.tracking.progress import format_duration
from avts_dist.train.checkpoint import list_checkpoints

__all__ = ["RunStatus", "RunStatusError", "format_status", "read_status"]

# Lines read from the end of metrics.jsonl for the recent figures (rate, data wait, loss).
TAIL_LINES = 200
# Log steps the data-wait fraction is averaged over.
WAIT_WINDOW = 10


class RunStatusError(ValueError):
    """The path is not a readable run directory (one line, names the path)."""


@dataclass
class RunStatus:
    run_dir: str
    run_name: str
    # starting (no step yet) | running | stopped (no progress for stale_after_s, not done) |
    # finished; MLflow's own status, when reachable, is in mlflow_status.
    state: str
    step: int
    total_steps: int | None
    steps_per_epoch: int | None
    epoch: float | None  # epochs completed (fractional)
    num_epochs: float | None
    samples_seen: int
    loss: float | None
    steps_per_s: float | None
    samples_per_s: float | None
    eta_s: float | None
    last_update_s: float | None  # seconds since metrics.jsonl last changed
    checkpoint: dict[str, Any] | None  # tag, step, url, age_s of the newest complete one
    curriculum_stage: str | None
    curriculum_mix: dict[str, float] | None  # the stage's negative mix (weights)
    curriculum_stage_index: int | None
    num_curriculum_stages: int
    curriculum_since_step: int | None
    skipped_total: int | None
    skipped_by_reason: dict[str, int] | None
    filtered_by_reason: dict[str, int] | None  # clips the loader leaves out of the index
    data_wait_fraction: float | None
    val_metrics: dict[str, float] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    mlflow_status: str | None = None
    mlflow_url: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _read_text(fs, path: str) -> str | None:
    try:
        return fs.cat_file(path).decode()
    except FileNotFoundError:
        return None


def _tail_records(text: str, num_lines: int) -> tuple[list[dict[str, Any]], int]:
    """The last ``num_lines`` JSON records and the number of lines that were not JSON.

    The unterminated last line is one the trainer is still writing: skipped without a count.
    """
    parts = text.rsplit("\n", num_lines + 1)
    lines = parts[1:] if len(parts) > num_lines + 1 else parts
    records, num_bad = [], 0
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            num_bad += i != len(lines) - 1
    return records, num_bad


def _last_with(lines: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    return next((ln for ln in reversed(lines) if key in ln), None)


def _age_s(fs, path: str, now: float) -> float | None:
    try:
        return max(0.0, now - fs.modified(path).timestamp())
    except (FileNotFoundError, NotImplementedError, OSError):
        return None


def _load_config(fs, run_dir: str) -> tuple[Config | None, list[str]]:
    text = _read_text(fs, join(run_dir, "config.yaml"))
    if text is None:
        return None, ["no config.yaml: total steps, curriculum and checkpoints unknown"]
    try:
        return config_from_dict(yaml.safe_load(text)), []
    except (ConfigError, yaml.YAMLError) as exc:
        return None, [f"config.yaml unreadable ({str(exc).splitlines()[0]})"]


def _checkpoint_dir(cfg: Config, run_url: str) -> str:
    """checkpoint.dir as this reader sees it: under the given run dir when it was run.dir's."""
    ckpt = cfg.checkpoint.dir.rstrip("/")
    configured_run = cfg.run.dir.rstrip("/")
    if configured_run and (ckpt == configured_run or ckpt.startswith(configured_run + "/")):
        return run_url.rstrip("/") + ckpt[len(configured_run) :]
    return ckpt


def _dataset_epoch(cfg: Config) -> tuple[int | None, dict[str, int] | None, str | None]:
    """(steps per epoch, clips filtered out by reason, error) from the dataset index, read the
    way the trainer's loader reads it (one index read and one clip read; no worker starts)."""
    from avts_dist.data import build_loader

    try:
        loader = build_loader(cfg.data, rank=0, world_size=1, train=True)
    except Exception as exc:  # DatasetError, StorageError, OSError...: reported, not fatal
        return None, None, str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    try:
        return loader.steps_per_epoch, loader.telemetry()["filtered"], None
    finally:
        loader.close()


def _total_steps(
    cfg: Config | None, lines: list[dict[str, Any]], read_dataset: bool
) -> tuple[int | None, int | None, dict[str, int] | None, list[str]]:
    """(total steps, steps per epoch, filtered clips by reason, notes)."""
    written = _last_with(lines, "total_steps")
    if cfg is None:
        return (int(written["total_steps"]) if written else None), None, None, []
    notes: list[str] = []
    steps_per_epoch = filtered = None
    if read_dataset:
        steps_per_epoch, filtered, error = _dataset_epoch(cfg)
        if error:
            notes.append(f"dataset {cfg.data.url} not readable from here: {error}")
    if written:
        return int(written["total_steps"]), steps_per_epoch, filtered, notes
    # The trainer's own rule: train.max_steps, or data.epochs of the loader's steps, whichever
    # ends first (train.max_steps=0: data.epochs alone).
    total, source = cfg.train.max_steps, "train.max_steps"
    if cfg.data.epochs > 0:
        if steps_per_epoch is None:
            if total <= 0:
                return (
                    None,
                    None,
                    filtered,
                    [*notes, "total steps unknown (data.epochs, no dataset)"],
                )
        else:
            data_end = cfg.data.epochs * steps_per_epoch
            if total <= 0 or data_end < total:
                total, source = data_end, "data.epochs x the dataset's steps per epoch"
    notes.append(f"total steps from {source} (the trainer does not write them)")
    return total, steps_per_epoch, filtered, notes


def _rate(tail: list[dict[str, Any]]) -> tuple[float | None, str | None]:
    """Steps per second and where the figure comes from."""
    timed = [ln for ln in tail if isinstance(ln.get("time"), (int, float))]
    if len(timed) >= 2 and timed[-1]["time"] > timed[0]["time"]:
        span = timed[-1]["time"] - timed[0]["time"]
        return (timed[-1]["step"] - timed[0]["step"]) / span, None
    last = _last_with(tail, "train/step_s")
    if last and last["train/step_s"] > 0:
        return 1.0 / last["train/step_s"], (
            "rate from train/step_s (compute + data wait; validation and checkpoint time excluded)"
        )
    return None, None


def _curriculum(
    cfg: Config | None, text: str
) -> tuple[str | None, int | None, int, int | None, dict[str, float] | None]:
    """(stage name, index, number of stages, since step, negative mix) at the end of the log."""
    if cfg is None:
        return None, None, 0, None, None
    stages = cfg.curriculum.stages
    index = 0 if cfg.curriculum.enabled else len(stages) - 1
    since = 0 if cfg.curriculum.enabled else None
    # Transitions are rare: only the lines that carry one are parsed.
    for line in text.split("\n"):
        if '"curriculum/stage_index"' in line:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            index, since = int(rec["curriculum/stage_index"]), int(rec["step"])
    stage = stages[min(index, len(stages) - 1)]
    return stage.name, index, len(stages), since, dict(stage.negative_mix)


def _mlflow(tracking_uri: str, run_id: str) -> tuple[str | None, str | None, str | None]:
    """(status, UI link, problem) of the run: asked over REST from a server (5 s timeout) or
    from a local store given by an absolute path; a relative store is the trainer's cwd's."""
    if tracking_uri.startswith(("http://", "https://")):
        base = tracking_uri.rstrip("/")
        url = f"{base}/api/2.0/mlflow/runs/get?" + urllib.parse.urlencode({"run_id": run_id})
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                info = json.load(resp)["run"]["info"]
        except Exception as exc:  # URLError, HTTPError, timeout, bad JSON
            return None, None, f"MLflow server {base} not reachable: {exc}"
        link = f"{base}/#/experiments/{info['experiment_id']}/runs/{run_id}"
        return info.get("status"), link, None
    if tracking_uri.startswith("file:") or tracking_uri.startswith("/"):
        from mlflow import MlflowClient

        import avts_dist.tracking.eval_runs  # noqa: F401  (allows MLflow's local file store)

        try:
            run = MlflowClient(tracking_uri=tracking_uri).get_run(run_id)
        except Exception as exc:  # MlflowException for an unknown run or a missing store
            return None, None, f"MLflow run not found in {tracking_uri}: {str(exc)[:200]}"
        return run.info.status, None, None
    return None, None, None


def _latest_checkpoint(
    cfg: Config, run_url: str, storage_options: dict | None, now: float, notes: list[str]
) -> dict[str, Any] | None:
    """tag, step, url and age of the newest complete checkpoint, or None."""
    ckpt_dir = _checkpoint_dir(cfg, run_url)
    options = dict(cfg.checkpoint.storage_options)
    if ckpt_dir.startswith(run_url.rstrip("/") + "/"):
        # Inside the run dir: the caller's options reach it too.
        options = {**(storage_options or {}), **options}
    try:
        found = list_checkpoints(ckpt_dir, options or None)
    except (StorageError, OSError, ValueError) as exc:
        notes.append(f"checkpoints at {ckpt_dir} not readable: {exc}")
        return None
    if not found:
        return None
    tag, meta = found[-1].tag, found[-1].meta
    saved = meta.get("time")
    return {
        "tag": tag,
        "step": int(meta.get("step", -1)),
        "url": f"{ckpt_dir}/{tag}",
        "age_s": max(0.0, now - saved) if isinstance(saved, (int, float)) else None,
    }


def read_status(
    run_url: str,
    storage_options: dict[str, Any] | None = None,
    *,
    stale_after_s: float = 600.0,
    read_dataset: bool = True,
    ask_mlflow: bool = True,
    now: float | None = None,
) -> RunStatus:
    """The status of the run in ``run_url`` (see the module docstring for what is read)."""
    now = time.time() if now is None else now
    try:
        fs, run_dir = get_fs(run_url, storage_options)
        metrics_path = join(run_dir, "metrics.jsonl")
        text = _read_text(fs, metrics_path)
        if text is None and not fs.exists(join(run_dir, "config.yaml")):
            raise RunStatusError(
                f"{run_url} is not a run directory (no metrics.jsonl or config.yaml)"
            )
        cfg, notes = _load_config(fs, run_dir)
        last_update = _age_s(fs, metrics_path, now) if text is not None else None
    except (StorageError, OSError) as exc:
        raise RunStatusError(f"cannot read run directory {run_url}: {exc}") from None
    text = text or ""
    # The tail for the recent figures; the whole file is only scanned for rare events.
    tail, num_bad = _tail_records(text, TAIL_LINES)
    if num_bad:
        notes.append(f"{num_bad} line(s) of metrics.jsonl are not JSON (skipped)")
    last = tail[-1] if tail else {}
    step = int(last.get("step", 0))

    total, steps_per_epoch, filtered, more = _total_steps(cfg, tail, read_dataset)
    notes += more
    steps_per_s, rate_note = _rate(tail)
    if rate_note:
        notes.append(rate_note)
    batch = cfg.data.global_batch_size if cfg else None
    finished = total is not None and step >= total

    checkpoint = _latest_checkpoint(cfg, run_url, storage_options, now, notes) if cfg else None
    finished = finished and checkpoint is not None and checkpoint["step"] >= step

    if not tail:
        state = "starting"
    elif finished:
        state = "finished"
    elif last_update is not None and last_update > stale_after_s:
        state = "stopped"
    else:
        state = "running"

    stage, stage_index, num_stages, since, mix = _curriculum(cfg, text)
    log_lines = [ln for ln in tail if "data/wait_fraction" in ln][-WAIT_WINDOW:]
    wait = sum(ln["data/wait_fraction"] for ln in log_lines) / len(log_lines) if log_lines else None
    skipped_line = _last_with(tail, "data/skipped_total")
    by_reason = None
    if skipped_line is not None:
        by_reason = {
            k.split("/", 2)[2]: int(v)
            for k, v in skipped_line.items()
            if k.startswith("data/skipped/")
        } or None
        if by_reason is None and skipped_line["data/skipped_total"]:
            notes.append("skipped clips by reason: the trainer writes only data/skipped_total")
    finite = [ln for ln in tail if isinstance(ln.get("loss"), (int, float))]
    val_line = _last_with(tail, "val/sync_acc_easy")
    val = {k: v for k, v in (val_line or {}).items() if k.startswith("val/sync_acc")}

    run_id = (_read_text(fs, join(run_dir, "mlflow_run_id")) or "").strip() or None
    mlflow_status = mlflow_url = None
    if run_id and cfg is not None and cfg.tracking.enabled and ask_mlflow:
        mlflow_status, mlflow_url, problem = _mlflow(cfg.tracking.uri, run_id)
        if problem:
            notes.append(problem)

    remaining = None if total is None else max(0, total - step)
    return RunStatus(
        run_dir=run_url,
        run_name=cfg.run.name if cfg else run_url.rstrip("/").rsplit("/", 1)[-1],
        state=state,
        step=step,
        total_steps=total,
        steps_per_epoch=steps_per_epoch,
        epoch=step / steps_per_epoch if steps_per_epoch else last.get("epoch"),
        num_epochs=(total / steps_per_epoch) if (total and steps_per_epoch) else None,
        samples_seen=int(last.get("samples_seen", 0)),
        loss=finite[-1]["loss"] if finite else None,
        steps_per_s=steps_per_s,
        samples_per_s=steps_per_s * batch if (steps_per_s and batch) else None,
        eta_s=(
            0.0
            if finished
            else (remaining / steps_per_s if (remaining is not None and steps_per_s) else None)
        ),
        last_update_s=last_update,
        checkpoint=checkpoint,
        curriculum_stage=stage,
        curriculum_mix=mix,
        curriculum_stage_index=stage_index,
        num_curriculum_stages=num_stages,
        curriculum_since_step=since,
        skipped_total=int(skipped_line["data/skipped_total"]) if skipped_line else None,
        skipped_by_reason=by_reason,
        filtered_by_reason=filtered,
        data_wait_fraction=wait,
        val_metrics=val,
        mlflow_run_id=run_id,
        mlflow_status=mlflow_status,
        mlflow_url=mlflow_url,
        notes=notes,
    )


def format_status(st: RunStatus) -> str:
    """The human-readable form: one labelled line per figure, then how figures were derived."""
    rows: list[tuple[str, str]] = [("run", f"{st.run_name}  ({st.run_dir})")]
    state = st.state
    if st.last_update_s is not None:
        state += f" (metrics.jsonl updated {format_duration(st.last_update_s)} ago)"
    if st.mlflow_status:
        state += f"; MLflow: {st.mlflow_status}"
    rows.append(("state", state))
    of = f" / {st.total_steps}" if st.total_steps is not None else " / unknown"
    pct = f" ({100.0 * st.step / st.total_steps:.0f}%)" if st.total_steps else ""
    rows.append(("step", f"{st.step}{of}{pct}, {st.samples_seen} samples"))
    if st.epoch is not None:
        epochs = f"{st.epoch:.2f}"
        if st.num_epochs is not None:
            epochs += f" of {st.num_epochs:.2f} ({st.steps_per_epoch} steps/epoch)"
        rows.append(("epoch", epochs))
    if st.steps_per_s:
        rate = f"{st.steps_per_s:.3g} steps/s"
        if st.samples_per_s:
            rate += f", {st.samples_per_s:.3g} samples/s"
        rows.append(("rate", rate))
    rows.append(("ETA", "done" if st.state == "finished" else format_duration(st.eta_s)))
    if st.loss is not None:
        rows.append(("loss", f"{st.loss:.4f}"))
    if st.checkpoint:
        ck = st.checkpoint
        age = f", {format_duration(ck['age_s'])} ago" if ck["age_s"] is not None else ""
        rows.append(("checkpoint", f"{ck['tag']} (step {ck['step']}{age})  {ck['url']}"))
    else:
        rows.append(("checkpoint", "none complete yet"))
    if st.curriculum_stage is not None:
        since = f", since step {st.curriculum_since_step}" if st.curriculum_since_step else ""
        mix = ", ".join(f"{k} {v:g}" for k, v in (st.curriculum_mix or {}).items())
        rows.append(
            (
                "curriculum",
                f"{st.curriculum_stage} ({mix}): stage {st.curriculum_stage_index + 1} of "
                f"{st.num_curriculum_stages}{since}",
            )
        )
    if st.data_wait_fraction is not None:
        rows.append(
            ("data wait", f"{100 * st.data_wait_fraction:.0f}% of step time (recent log steps)")
        )
    if st.skipped_total is not None:
        reasons = (
            " (" + ", ".join(f"{k} {v}" for k, v in sorted(st.skipped_by_reason.items())) + ")"
            if st.skipped_by_reason
            else ""
        )
        rows.append(("skipped", f"{st.skipped_total} clips replaced{reasons}"))
    if st.filtered_by_reason:
        text = ", ".join(f"{k} {v}" for k, v in sorted(st.filtered_by_reason.items()))
        rows.append(("filtered", f"clips left out of the index: {text}"))
    if st.val_metrics:
        rows.append(("validation", ", ".join(f"{k} {v:.3f}" for k, v in st.val_metrics.items())))
    if st.mlflow_run_id:
        rows.append(("mlflow", st.mlflow_url or st.mlflow_run_id))
    width = max(len(k) for k, _ in rows)
    out = [f"{k.ljust(width)}  {v}" for k, v in rows]
    out += [f"note: {n}" for n in st.notes]
    return "\n".join(out)
