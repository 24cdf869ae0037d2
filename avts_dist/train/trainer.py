"""The pretraining loop: loader -> two-stream model -> AVTS loss -> DeepSpeed step.

Resumable state, each under a fixed key of the checkpoint's client state (format versioned):
``trainer`` (step, epoch, skipped-step counts), ``curriculum``, ``loader`` (global: identical on
every rank and valid at any world size), ``rng`` (rank 0; every rank also writes its own
``rng_rank_*.pt``), ``mlflow_run_id`` and ``config`` (the resolved config). Model, optimizer and
LR scheduler go through DeepSpeed's sharded checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from avts_dist.config import (
    Config,
    config_to_dict,
    flatten_config,
    redacted_config_dict,
    save_config,
)
from avts_dist.distributed import collectives as C
from avts_dist.distributed.engine import build_ds_config, convert_to_universal, initialize_engine
from avts_dist.storage import redact
from avts_dist.train.checkpoint import (
    CHECKPOINT_FORMAT_VERSION,
    COMPLETE,
    CheckpointManager,
    find_latest_complete,
    get_rng_state,
    set_rng_state,
)

log = logging.getLogger("avts.train")

__all__ = ["TrainResult", "Trainer"]

VAL_KINDS = ("easy", "hard")


@dataclasses.dataclass
class TrainResult:
    status: str  # completed | preempted | failed
    step: int
    final_loss: float | None
    run_dir: str
    checkpoint_dir: str
    mlflow_run_id: str | None
    message: str = ""


class NonFiniteLossError(RuntimeError):
    pass


def _to_device(batch: dict[str, Any], device: torch.device, dtype: torch.dtype | None):
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
        out[key] = value
    return out


class Trainer:
    """Builds every component for this rank; ``train()`` runs to the end, a signal or a failure."""

    def __init__(self, cfg: Config, ctx: C.DistContext) -> None:
        from avts_dist.curriculum import Curriculum
        from avts_dist.data import build_loader
        from avts_dist.losses import build_loss
        from avts_dist.models import build_model

        self.cfg, self.ctx = cfg, ctx
        self.rank, self.world_size = ctx.rank, ctx.world_size
        self.is_main = ctx.rank == 0
        self.run_dir = Path(cfg.run.dir)
        self.stop_signal: int | None = None
        self.step = 0
        self.num_skipped_steps = 0
        self.num_nonfinite_in_row = 0
        self.val_metrics: dict[str, float] = {}
        self.mlflow_run_id: str = ""
        self.tracker = None
        self._pending_losses: list[tuple[int, int, torch.Tensor, float, dict]] = []
        self._last_loss: float | None = None

        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        torch.manual_seed(cfg.data.seed)

        self.ckpt = CheckpointManager(
            cfg.checkpoint,
            run_dir=self.run_dir,
            rank=self.rank,
            world_size=self.world_size,
            barrier=C.barrier,
        )
        resume = self._find_resume()  # (local root, tag, meta) or None, identical on every rank

        self.loader = build_loader(cfg.data, rank=self.rank, world_size=self.world_size, train=True)
        self.val_loaders = {}
        if cfg.train.val_every_steps > 0:
            for kind in VAL_KINDS:
                data_cfg = dataclasses.replace(cfg.data, negative_mix={kind: 1.0})
                self.val_loaders[kind] = build_loader(
                    data_cfg, rank=self.rank, world_size=self.world_size, train=False
                )
        self.max_steps = (
            cfg.train.epochs * self.loader.steps_per_epoch
            if cfg.train.epochs > 0
            else cfg.train.max_steps
        )

        model = build_model(cfg.model)
        self.loss_fn = build_loss(cfg.loss)
        self.curriculum = Curriculum(cfg.curriculum)

        load_universal = False
        load_root, load_tag = None, None
        if resume is not None:
            load_root, load_tag, meta = resume
            if meta["world_size"] != self.world_size and meta.get("zero_stage", 0) > 0:
                load_tag = self._universal(load_root, load_tag)
                load_universal = True
        ds_config = build_ds_config(
            cfg.deepspeed,
            cfg.optim,
            global_batch_size=cfg.data.global_batch_size,
            world_size=self.world_size,
            total_steps=self.max_steps,
            load_universal=load_universal,
        )
        self.engine = initialize_engine(model, ds_config, backend=cfg.deepspeed.backend)
        self.device = self.engine.device
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.deepspeed.precision)
        self.micro_batches = cfg.deepspeed.grad_accum_steps

        if resume is not None:
            from avts_dist.distributed.engine import load_engine_checkpoint

            client = load_engine_checkpoint(self.engine, load_root, load_tag)
            self.load_state_dict(client, rng_file=self.ckpt.rng_path(load_root, resume[1]))
            if self.is_main:
                log.info("resumed from %s/%s at step %d", load_root, resume[1], self.step)
        else:
            self.loader.set_negative_mix(self.curriculum.negative_mix)
        self.resumed_from = None if resume is None else f"{load_root}/{resume[1]}"

    # ---- resume helpers ----

    def _find_resume(self):
        cfg = self.cfg
        choice = None
        if self.is_main and cfg.resume not in ("", "none"):
            if cfg.resume == "auto":
                found = self.ckpt.latest()
                if found is not None:
                    choice = (cfg.checkpoint.dir, found[0], found[1])
            else:
                path = cfg.resume.rstrip("/")
                marker = Path(path) / COMPLETE
                if marker.is_file():
                    choice = (
                        str(Path(path).parent),
                        Path(path).name,
                        json.loads(marker.read_text()),
                    )
                else:
                    found = find_latest_complete(path, cfg.checkpoint.storage_options or None)
                    if found is None:
                        choice = ("error", f"no complete checkpoint under resume={path}", {})
                    else:
                        choice = (path, found[0], found[1])
        choice = C.broadcast_object(choice)
        if choice is None:
            return None
        if choice[0] == "error":
            raise ValueError(choice[1])
        source, tag, meta = choice
        local_root = self.ckpt.fetch(tag, source=source)
        return Path(local_root), tag, meta

    def _universal(self, root: Path, tag: str) -> str:
        """DeepSpeed's universal form of ``tag`` (converted once by rank 0, then reused)."""
        utag = f"{tag}_universal"
        if self.is_main and not (root / utag / COMPLETE).is_file():
            t0 = time.perf_counter()
            tmp = root / f".tmp-{utag}"
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            convert_to_universal(root / tag, tmp)
            for rng in (root / tag).glob("rng_rank_*.pt"):
                shutil.copy(rng, tmp / rng.name)
            (tmp / COMPLETE).write_text((root / tag / COMPLETE).read_text())
            shutil.rmtree(root / utag, ignore_errors=True)
            tmp.rename(root / utag)
            log.info(
                "converted %s to a universal checkpoint in %.1fs (world size change)",
                tag,
                time.perf_counter() - t0,
            )
        C.barrier()
        return utag

    # ---- state ----

    def state_dict(self) -> dict[str, Any]:
        return {
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "trainer": {
                "step": self.step,
                "epoch": self.loader.epoch,
                "num_skipped_steps": self.num_skipped_steps,
                "num_nonfinite_in_row": self.num_nonfinite_in_row,
                "samples_seen": self.step * self.cfg.data.global_batch_size,
                "val_metrics": dict(self.val_metrics),
            },
            "curriculum": self.curriculum.state_dict(),
            "loader": self.loader.state_dict(),
            "rng": get_rng_state(),
            "mlflow_run_id": self.mlflow_run_id,
            # Redacted: checkpoints are copied and uploaded; credentials come from the user again.
            "config": redacted_config_dict(self.cfg),
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any], rng_file: Path | None = None) -> None:
        version = state.get("format_version")
        if version != CHECKPOINT_FORMAT_VERSION:
            raise ValueError(
                f"checkpoint format_version {version!r}; this code reads {CHECKPOINT_FORMAT_VERSION}"
            )
        saved_model = state.get("config", {}).get("model")
        if saved_model is not None and saved_model != dataclasses.asdict(self.cfg.model):
            raise ValueError("the checkpoint's model config differs from this run's model.* keys")
        tr = state["trainer"]
        self.step = int(tr["step"])
        self.num_skipped_steps = int(tr["num_skipped_steps"])
        self.num_nonfinite_in_row = int(tr["num_nonfinite_in_row"])
        self.val_metrics = dict(tr.get("val_metrics", {}))
        self.curriculum.load_state_dict(state["curriculum"])
        self.loader.load_state_dict(state["loader"])
        self.mlflow_run_id = state.get("mlflow_run_id") or ""
        same_world = state.get("world_size") == self.world_size
        if same_world and rng_file is not None and rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
        else:
            # A new world size has no per-rank RNG to continue: derive it from the step.
            torch.manual_seed(self.cfg.data.seed + 1_000_003 * self.step + self.rank)

    # ---- one step ----

    def train_step(self, batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], bool]:
        """One optimizer step over this rank's batch (``grad_accum_steps`` micro-batches).

        Returns the loss output of the last micro-batch and whether the step was applied: a
        non-finite loss on any rank skips the backward and the update on every rank.
        """
        batch = _to_device(batch, self.device, self.dtype)
        local = batch["video"].shape[0]
        micro = local // self.micro_batches
        weights = self.curriculum.loss_weights or None
        applied = True
        out: dict[str, torch.Tensor] = {}
        for i in range(self.micro_batches):
            sl = slice(i * micro, (i + 1) * micro)
            emb = self.engine(batch["video"][sl], batch["audio"][sl], batch["neg_audio"][sl])
            out = self.loss_fn(
                emb["video_emb"],
                emb["audio_emb"],
                emb.get("neg_audio_emb"),
                batch["neg_kind"][sl],
                rank=self.rank,
                world_size=self.world_size,
                weights=weights,
                sync_logit=emb.get("sync_logit"),
                neg_sync_logit=emb.get("neg_sync_logit"),
                step=self.step,
            )
            loss = out["loss"]
            if (self.step + 1) in self.cfg.train.inject_nan_at_steps:
                loss = loss * float("nan")
                out["loss"] = loss
            # One all-reduce carries both decisions every ranks must share: skip, and stop.
            flags = torch.tensor(
                [
                    float(not torch.isfinite(loss.detach()).item()),
                    float(self.stop_signal is not None),
                ]
            )
            flags = C.all_reduce_max(flags)
            if flags[1] > 0 and self.stop_signal is None:
                self.stop_signal = signal.SIGTERM  # another rank got it
            if flags[0] > 0:
                applied = False
                if self.micro_batches == 1:
                    break  # exact skip: no backward, no update, DeepSpeed state untouched
                # With accumulation, earlier micro-batches already ran backward: this one adds a
                # zero gradient so DeepSpeed's accumulation boundary stays where it is.
                loss = sum(p.sum() for p in self.engine.module.parameters()) * 0.0
            self.engine.backward(loss)
            self.engine.step()
        return out, applied

    # ---- validation ----

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        from avts_dist.losses import reduce_metrics

        self.engine.eval()
        results: dict[str, float] = {}
        gbs = self.cfg.data.global_batch_size
        for kind, loader in self.val_loaders.items():
            # Only full global batches: every rank must take part in each gathered loss.
            num_batches = min(self.cfg.train.val_batches, len(loader.sampler) // gbs)
            if num_batches == 0:
                continue
            accs = []
            it = iter(loader)
            for _ in range(num_batches):
                batch = _to_device(next(it), self.device, self.dtype)
                emb = self.engine(batch["video"], batch["audio"], batch["neg_audio"])
                out = self.loss_fn(
                    emb["video_emb"],
                    emb["audio_emb"],
                    emb.get("neg_audio_emb"),
                    batch["neg_kind"],
                    rank=self.rank,
                    world_size=self.world_size,
                    sync_logit=emb.get("sync_logit"),
                    neg_sync_logit=emb.get("neg_sync_logit"),
                )
                reduced = reduce_metrics(out, self.world_size)
                if f"acc/{kind}" in reduced:
                    accs.append(reduced[f"acc/{kind}"])
            it.close()
            if accs:
                results[f"val/sync_acc_{kind}"] = sum(accs) / len(accs)
                # The loss's own metric name too, for plateau triggers written against it.
                results[f"val/acc/{kind}"] = results[f"val/sync_acc_{kind}"]
        self.engine.train()
        return results

    # ---- the loop ----

    def _flush_metrics(self, force_mlflow: bool = False) -> None:
        """Writes the buffered per-step lines: one all-reduce and one host sync per flush."""
        if not self._pending_losses:
            return
        losses = torch.stack([p[2].detach().float().reshape(()) for p in self._pending_losses])
        losses = (C.all_reduce_sum(losses) / self.world_size).tolist()
        lines = []
        for (step, epoch, _, lr, extra), loss in zip(self._pending_losses, losses, strict=True):
            line = {
                "step": step,
                "epoch": epoch,
                # null, not NaN, for a skipped step: the file stays strict JSON.
                "loss": loss if math.isfinite(loss) else None,
                "lr": lr,
                "samples_seen": step * self.cfg.data.global_batch_size,
            }
            line.update(extra)
            lines.append(line)
        self._pending_losses = []
        finite = [ln["loss"] for ln in lines if ln["loss"] is not None]
        if finite:
            self._last_loss = finite[-1]
        if not self.is_main:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            for line in lines:
                f.write(json.dumps(line) + "\n")
        if self.tracker is not None:
            for line in lines:
                metrics = {
                    k: v
                    for k, v in line.items()
                    if k not in ("step", "curriculum", "skipped_step")
                    and isinstance(v, (int, float))
                }
                self.tracker.log_metrics(metrics, step=line["step"])
            if force_mlflow:
                self.tracker.flush()

    def _start_tracking(self) -> None:
        cfg = self.cfg
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            metrics_path = self.run_dir / "metrics.jsonl"
            # Steps after the checkpoint we resume from are replayed: drop their old lines.
            if metrics_path.exists():
                kept = [
                    ln
                    for ln in metrics_path.read_text().splitlines()
                    if ln.strip() and json.loads(ln)["step"] <= self.step
                ]
                metrics_path.write_text("".join(ln + "\n" for ln in kept))
            if cfg.tracking.enabled:
                from avts_dist.tracking import start_or_resume_run

                run_id = self.mlflow_run_id
                id_file = self.run_dir / "mlflow_run_id"
                if not run_id and self.step > 0 and id_file.exists():
                    run_id = id_file.read_text().strip()
                self.tracker = start_or_resume_run(
                    cfg.tracking,
                    run_name=cfg.run.name,
                    run_id=run_id,
                    params=flatten_config(cfg),
                    tags={"avts.world_size": str(self.world_size)},
                )
                self.mlflow_run_id = self.tracker.run_id
                id_file.write_text(self.mlflow_run_id + "\n")
                self.tracker.log_text(
                    yaml.safe_dump(redact(config_to_dict(cfg)), sort_keys=False), "config.yaml"
                )
                if self.resumed_from:
                    self.tracker.set_tags({"avts.resumed_from": self.resumed_from})
        self.mlflow_run_id = C.broadcast_object(self.mlflow_run_id)

    def save_checkpoint(self) -> str:
        self._flush_metrics()
        tag = self.ckpt.save(
            self.engine,
            self.step,
            self.state_dict(),
            meta={
                "zero_stage": self.cfg.deepspeed.zero_stage,
                "global_batch_size": self.cfg.data.global_batch_size,
                "mlflow_run_id": self.mlflow_run_id,
                "epoch": self.loader.epoch,
            },
        )
        if self.is_main and self.tracker is not None:
            self.tracker.log_dict(
                {"checkpoint": f"{self.cfg.checkpoint.dir.rstrip('/')}/{tag}", "step": self.step},
                "checkpoints/latest.json",
            )
            self.tracker.log_metrics(
                {"checkpoint/save_s": self.ckpt.last_save_s}, step=self.step, flush=True
            )
        return tag

    def train(self) -> TrainResult:
        cfg = self.cfg
        self._start_tracking()
        progress = None
        if self.is_main and cfg.train.progress:
            from tqdm.auto import tqdm

            progress = tqdm(total=self.max_steps, initial=self.step, desc="train", unit="step")
        status, message = "completed", ""
        data_iter = iter(self.loader)
        wait_s = compute_s = 0.0
        # A resumed run already has its starting step on disk.
        last_saved = self.step if self.resumed_from else -1
        try:
            while self.step < self.max_steps:
                t0 = time.perf_counter()
                try:
                    batch = next(data_iter)
                except StopIteration:
                    break
                t1 = time.perf_counter()
                out, applied = self.train_step(batch)
                t2 = time.perf_counter()
                wait_s += t1 - t0
                compute_s += t2 - t1
                self.step += 1
                epoch = self.loader.epoch
                extra: dict[str, Any] = {}
                if not applied:
                    self.num_skipped_steps += 1
                    self.num_nonfinite_in_row += 1
                    extra["skipped_step"] = True
                    extra["num_skipped_steps"] = self.num_skipped_steps
                else:
                    self.num_nonfinite_in_row = 0
                lr = float(self.engine.get_lr()[0])
                log_step = self.step % cfg.train.log_every == 0 or self.step == self.max_steps
                if log_step and out and applied:
                    from avts_dist.losses import reduce_metrics

                    terms = reduce_metrics(
                        {k: v for k, v in out.items() if k != "loss"}, self.world_size
                    )
                    extra.update({f"train/{k}": v for k, v in terms.items()})
                    tel = self.loader.telemetry()
                    total = wait_s + compute_s
                    extra["data/wait_fraction"] = wait_s / total if total > 0 else 0.0
                    extra["data/clips_per_s"] = tel["clips_per_s"]
                    extra["data/skipped_total"] = tel["skipped_total"]
                    extra["train/step_s"] = total / max(1, cfg.train.log_every)
                    wait_s = compute_s = 0.0
                if self.val_loaders and self.step % cfg.train.val_every_steps == 0:
                    self.val_metrics = self.validate()
                    extra.update(self.val_metrics)
                events = self.curriculum.update(
                    step=self.step,
                    epoch=epoch,
                    val_metrics=self.val_metrics if "val/sync_acc_easy" in extra else None,
                )
                if events:
                    self.loader.set_negative_mix(self.curriculum.negative_mix)
                    extra["curriculum"] = events
                    extra["curriculum/stage_index"] = self.curriculum.stage_index
                    if self.is_main:
                        for ev in events:
                            log.info(
                                "curriculum: %s -> %s at step %d",
                                ev["from_stage"],
                                ev["to_stage"],
                                self.step,
                            )
                        if self.tracker is not None:
                            self.tracker.log_dict(
                                {"events": self.curriculum.history}, "curriculum/history.json"
                            )
                            self.tracker.set_tags(
                                {"avts.curriculum_stage": self.curriculum.stage.name}
                            )
                pending = out["loss"] if (out and applied) else torch.tensor(float("nan"))
                self._pending_losses.append((self.step, epoch, pending.detach(), lr, extra))
                if log_step or events or "val/sync_acc_easy" in extra:
                    self._flush_metrics()
                    if progress is not None and self._last_loss is not None:
                        progress.set_postfix(loss=f"{self._last_loss:.4f}", refresh=False)
                if progress is not None:
                    progress.update(1)
                if self.num_nonfinite_in_row >= cfg.train.max_nonfinite_steps:
                    self.save_checkpoint()
                    last_saved = self.step
                    status = "failed"
                    message = (
                        f"stopping: {self.num_nonfinite_in_row} optimizer steps in a row had a "
                        f"non-finite loss (train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}"
                        f"); checkpoint saved at step {self.step}"
                    )
                    break
                if self.stop_signal is not None:
                    self.save_checkpoint()
                    last_saved = self.step
                    status = "preempted"
                    message = (
                        f"preempted by signal {self.stop_signal}: checkpoint at step {self.step}"
                    )
                    break
                every = cfg.checkpoint.every_steps
                if every and self.step % every == 0:
                    self.save_checkpoint()
                    last_saved = self.step
            if status == "completed" and last_saved != self.step:
                self.save_checkpoint()
            self._flush_metrics(force_mlflow=True)
        except BaseException:
            status = "failed"
            if self.tracker is not None:
                self.tracker.end("FAILED")
                self.tracker = None
            raise
        finally:
            if progress is not None:
                progress.close()
            if hasattr(data_iter, "close"):
                data_iter.close()
            if self.tracker is not None:
                mlflow_status = {"completed": "FINISHED", "preempted": "KILLED"}.get(
                    status, "FAILED"
                )
                self.tracker.end(mlflow_status)
        if message and self.is_main:
            log.warning(message)
        final = (
            self._last_loss if self._last_loss is None or math.isfinite(self._last_loss) else None
        )
        return TrainResult(
            status=status,
            step=self.step,
            final_loss=final,
            run_dir=str(self.run_dir),
            checkpoint_dir=self.cfg.checkpoint.dir,
            mlflow_run_id=self.mlflow_run_id or None,
            message=message,
        )

    def close(self) -> None:
        self.loader.close()
        for loader in self.val_loaders.values():
            loader.close()
