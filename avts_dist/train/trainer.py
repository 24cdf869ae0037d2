"""The pretraining loop: loader -> two-stream model -> AVTS loss -> DeepSpeed step
(``train.objective=video_ssl``: two-view loader -> video net + projection -> two-view InfoNCE).

Resumable state, each under a fixed key of the checkpoint's client state (format versioned):
``trainer`` (step, epoch, skipped-step counts), ``curriculum``, ``loader`` (global: identical on
every rank and valid at any world size), ``rng`` (rank 0; every rank also writes its own
``rng_rank_*.pt``), ``mlflow_run_id`` and ``config`` (the resolved config). Model, optimizer and
LR scheduler go through DeepSpeed's sharded checkpoint (``train/checkpoint.py``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import time
from pathlib import Path
from typing import Any

import torch

from avts_dist.config import Config, redacted_config_dict, save_config
from avts_dist.curriculum import Curriculum
from avts_dist.data import build_loader
from avts_dist.distributed import collectives as C
from avts_dist.distributed.engine import (
    build_ds_config,
    initialize_engine,
    load_engine_checkpoint,
    optimizer_step,
)
from avts_dist.losses import build_loss, reduce_metrics
from avts_dist.models import build_model
from avts_dist.tracking import (
    MetricsLogger,
    NoTracking,
    Progress,
    StepRecord,
    StepTimer,
    open_node_metrics,
    open_train_run,
    sum_over_ranks,
    telemetry_fields,
)
from avts_dist.train.batch import micro_batches, to_device
from avts_dist.train.checkpoint import (
    CHECKPOINT_FORMAT_VERSION,
    CheckpointError,
    CheckpointManager,
    get_rng_state,
    set_rng_state,
)
from avts_dist.train.hooks import TrainHooks
from avts_dist.train.validation import build_val_loaders, sync_accuracy

log = logging.getLogger("avts.train")

__all__ = ["StepOutput", "TrainResult", "Trainer"]


@dataclasses.dataclass
class TrainResult:
    status: str  # completed | preempted | failed
    step: int
    final_loss: float | None
    run_dir: str
    checkpoint_dir: str
    mlflow_run_id: str | None
    message: str = ""


@dataclasses.dataclass
class StepOutput:
    terms: dict[str, torch.Tensor]  # the loss function's output for the last micro-batch
    loss: torch.Tensor | None  # mean loss over the micro-batches, on the device; None if skipped
    applied: bool


class Trainer:
    """Builds every component for this rank; ``train()`` runs to the end, a signal or a failure."""

    def __init__(self, cfg: Config, ctx: C.DistContext, hooks: TrainHooks | None = None) -> None:
        self.cfg, self.ctx, self.hooks = cfg, ctx, hooks or TrainHooks()
        self.rank, self.world_size, self.is_main = ctx.rank, ctx.world_size, ctx.rank == 0
        self.run_dir = Path(cfg.run.dir)
        self.stop_signal: int | None = None
        self.step = self.num_skipped_steps = self.num_nonfinite_in_row = 0
        self.num_applied_steps = 0  # optimizer steps applied by this process (not resumed ones)
        self.val_metrics: dict[str, float] = {}
        self.mlflow_run_id = ""
        self.tracker = NoTracking()
        self.node_metrics = None  # another node's system metrics (multi-node runs)
        C.set_determinism(cfg.train.deterministic, ctx.device)
        torch.manual_seed(cfg.data.seed)
        self.ckpt = CheckpointManager(
            cfg.checkpoint, run_dir=self.run_dir, rank=self.rank, world_size=self.world_size,
            on_event=self.hooks.on_checkpoint_event,
        )  # fmt: skip
        self.resume_plan = self.ckpt.plan_resume(cfg.resume)
        # Pinned batches (a pin-memory thread) let the host-to-device copy overlap compute.
        pin = ctx.device.type == "cuda"
        # video_ssl: two video windows per sample, no audio, no negatives to schedule.
        self.video_ssl = views = cfg.train.objective == "video_ssl"
        self.loader = build_loader(
            cfg.data, rank=self.rank, world_size=self.world_size, pin_memory=pin, views=views
        )
        self.val_loaders = {}
        if cfg.train.val_every_steps > 0:
            self.val_loaders = build_val_loaders(
                cfg.data, rank=self.rank, world_size=self.world_size, pin_memory=pin, views=views
            )
        self.max_steps = self._run_length()
        self.loss_fn = build_loss(cfg.loss, cfg.train.objective)
        self.curriculum = Curriculum(
            dataclasses.replace(cfg.curriculum, enabled=False) if views else cfg.curriculum
        )
        if views and self.is_main:
            log.info("train.objective=video_ssl: the curriculum does not apply and is ignored")
        plan = self.resume_plan
        saved_objective = plan.source.meta.get("objective", "avts") if plan else None
        if saved_objective not in (None, cfg.train.objective):
            raise ValueError(
                f"resume: {plan.source.url} was trained with train.objective={saved_objective}, "
                f"this run has train.objective={cfg.train.objective}"
            )
        ds_config = build_ds_config(
            cfg.deepspeed, cfg.optim, global_batch_size=cfg.data.global_batch_size,
            world_size=self.world_size, total_steps=self.max_steps,
            load_universal=plan is not None and plan.universal, use_cuda=ctx.device.type == "cuda",
        )  # fmt: skip
        model = build_model(cfg.model, cfg.train.objective)
        self.engine = initialize_engine(model, ds_config, backend=ctx.backend)
        self.device = self.engine.device
        self.micro_steps = cfg.deepspeed.grad_accum_steps
        self.metrics = MetricsLogger(
            self.run_dir / "metrics.jsonl", device=self.device, world_size=self.world_size,
            is_main=self.is_main, total_steps=self.max_steps,
        )  # fmt: skip
        if plan is not None:
            client = load_engine_checkpoint(self.engine, plan.local_root, plan.load_tag)
            self.load_state_dict(client, rng_file=plan.rng_file(self.rank))
            if self.is_main:
                log.info("resumed from %s at step %d", plan.source.url, self.step)
        else:
            self.loader.set_negative_mix(self.curriculum.negative_mix)

    def _run_length(self) -> int:
        """train.max_steps, or data.epochs of the loader's steps, whichever ends first."""
        max_steps = self.cfg.train.max_steps
        if self.cfg.data.epochs > 0:
            epoch_steps = self.cfg.data.epochs * self.loader.steps_per_epoch
            return min(max_steps, epoch_steps) if max_steps > 0 else epoch_steps
        return max_steps

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
            # Rank 0's tracker knows the id once the server has created the run (maybe late).
            "mlflow_run_id": self.tracker.run_id or self.mlflow_run_id,
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
        trainer = state["trainer"]
        self.step = int(trainer["step"])
        self.num_skipped_steps = int(trainer["num_skipped_steps"])
        self.num_nonfinite_in_row = int(trainer["num_nonfinite_in_row"])
        self.val_metrics = dict(trainer.get("val_metrics", {}))
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

    def _forward_loss(self, batch: dict[str, Any], **loss_kwargs) -> dict[str, torch.Tensor]:
        if self.video_ssl:  # loss_kwargs (negative-kind weights, step) do not apply
            views = self.engine(batch["video"], batch["video2"])
            return self.loss_fn(
                views["view1_emb"], views["view2_emb"], rank=self.rank, world_size=self.world_size
            )
        emb = self.engine(batch["video"], batch["audio"], batch["neg_audio"])
        # fp32 before the gather, so that its backward reduce-scatter sums gradients in fp32.
        emb = {k: v.float() for k, v in emb.items() if v is not None}
        # An early-fusion model has no embeddings, only sync logits (the loss's BCE-only mode).
        return self.loss_fn(
            emb.get("video_emb"),
            emb.get("audio_emb"),
            emb.get("neg_audio_emb"),
            batch["neg_kind"],
            rank=self.rank,
            world_size=self.world_size,
            sync_logit=emb.get("sync_logit"),
            neg_sync_logit=emb.get("neg_sync_logit"),
            **loss_kwargs,
        )

    def train_step(self, batch: dict[str, Any]) -> StepOutput:
        """One optimizer step over this rank's batch (``grad_accum_steps`` micro-batches).

        The health flags (a non-finite loss here, a stop signal here) stay on the device and are
        agreed by every rank in one all-reduce: one host sync per step. A non-finite loss on any
        rank skips the update on every rank (see ``engine.optimizer_step``).
        """
        parts = micro_batches(to_device(batch, self.device), self.micro_steps)
        nonfinite = torch.zeros((), device=self.device)
        losses, terms = [], {}
        for i, part in enumerate(parts):
            weights = self.curriculum.loss_weights or None
            terms = self._forward_loss(part, weights=weights, step=self.step)
            loss = terms["loss"]
            if self.hooks.on_loss is not None:
                loss = terms["loss"] = self.hooks.on_loss(self.step + 1, loss)
            nonfinite = torch.maximum(nonfinite, (~torch.isfinite(loss.detach())).float())
            losses.append(loss.detach().float())
            self.engine.backward(loss)
            if i < len(parts) - 1:
                self.engine.step()  # inside the accumulation: DeepSpeed only counts it
        stop = nonfinite.new_full((), float(self.stop_signal is not None))
        skip, stop_anywhere = C.agree_on_flags(torch.stack([nonfinite, stop]))
        if stop_anywhere and self.stop_signal is None:
            self.stop_signal = signal.SIGTERM  # another rank got it
        applied = optimizer_step(self.engine, skip=skip > 0)
        mean_loss = torch.stack(losses).mean() if applied else None
        return StepOutput(terms=terms, loss=mean_loss, applied=applied)

    # ---- validation ----

    def validate(self) -> dict[str, float]:
        self.engine.eval()
        try:
            return sync_accuracy(
                lambda batch: self._forward_loss(to_device(batch, self.device)),
                self.val_loaders,
                max_batches=self.cfg.train.val_batches,
                global_batch_size=self.cfg.data.global_batch_size,
                world_size=self.world_size,
            )
        finally:
            self.engine.train()

    # ---- the loop ----

    def _open_tracking(self) -> None:
        """Rank 0: config.yaml, metrics.jsonl cut back to the resumed step, the MLflow run."""
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.run_dir / "config.yaml")
            self.metrics.truncate_after(self.step)
            if self.cfg.tracking.enabled:
                source = self.resume_plan.source.url if self.resume_plan else ""
                self.tracker = self.metrics.tracker = open_train_run(
                    self.cfg, run_dir=self.run_dir, run_id=self.mlflow_run_id, step=self.step,
                    resumed_from=source, world_size=self.world_size,
                )  # fmt: skip
        self.mlflow_run_id = C.broadcast_object(self.tracker.run_id or self.mlflow_run_id)
        if not self.is_main and self.ctx.local_rank == 0:
            self.node_metrics = open_node_metrics(
                self.cfg, run_dir=self.run_dir, run_id=self.mlflow_run_id, rank=self.rank,
                world_size=self.world_size,
            )  # fmt: skip

    def save_checkpoint(self, *, quarantine: str = "") -> str:
        """Saves (and publishes) this state; ``quarantine``: keeps it under a quarantined name
        instead, never ``latest`` (see ``CheckpointManager.save``)."""
        self.metrics.flush()
        meta = {
            "zero_stage": self.cfg.deepspeed.zero_stage,
            "global_batch_size": self.cfg.data.global_batch_size,
            "mlflow_run_id": self.mlflow_run_id,
            "epoch": self.loader.epoch,
            "objective": self.cfg.train.objective,
        }
        tag = self.ckpt.save(self.engine, self.step, self.state_dict(), meta, quarantine=quarantine)
        if not quarantine:
            url = f"{self.cfg.checkpoint.dir.rstrip('/')}/{tag}"
            self.tracker.log_checkpoint(url, self.step, self.ckpt.last_save_s)
        return tag

    def _step_extras(self, out: StepOutput, timer: StepTimer) -> tuple[dict, bool]:
        """Skip counts, log-step metrics, validation and curriculum of the step just taken;
        returns the line's extra fields and whether to flush the metrics now."""
        cfg, extra = self.cfg, {}
        self.num_nonfinite_in_row = 0 if out.applied else self.num_nonfinite_in_row + 1
        if not out.applied:
            self.num_skipped_steps += 1
            extra.update(skipped_step=True, num_skipped_steps=self.num_skipped_steps)
        log_step = self.step % cfg.train.log_every == 0 or self.step == self.max_steps
        if log_step and out.applied:
            terms = reduce_metrics(
                {k: v for k, v in out.terms.items() if k != "loss"}, self.world_size
            )
            extra.update({f"train/{k}": v for k, v in terms.items()})
            telemetry = telemetry_fields(self.loader.telemetry())
            extra.update(timer.take(sum_over_ranks(telemetry, self.world_size)))
        validated = bool(self.val_loaders) and self.step % cfg.train.val_every_steps == 0
        if validated:
            self.val_metrics = self.validate()
            extra.update(self.val_metrics)
        events = self.curriculum.update(
            step=self.step,
            epoch=self.loader.epoch,
            val_metrics=self.val_metrics if validated else None,
        )
        if events:
            self.loader.set_negative_mix(self.curriculum.negative_mix)
            extra.update(curriculum=events)
            extra["curriculum/stage_index"] = self.curriculum.stage_index
            for ev in events if self.is_main else []:
                log.info(
                    "curriculum: %s -> %s at step %d", ev["from_stage"], ev["to_stage"], self.step
                )
            self.tracker.log_curriculum(self.curriculum.history, self.curriculum.stage.name)
        return extra, log_step or bool(events) or validated

    def _progress_fields(self) -> dict[str, Any]:
        latest, writer = self.metrics.latest, self.tracker.writer
        tracking = None
        if writer is not None and writer.is_down:
            tracking = f"MLflow down, {writer.outbox.num_pending} records buffered"
        return {
            "loss": self.metrics.last_loss,
            "data_wait": latest.get("data/wait_fraction"),
            "retries": latest.get("data/retries"),
            "tracking": tracking,
        }

    def _stop_reason(self) -> str | None:
        """``nonfinite`` or ``preempted`` when the run must stop after this step."""
        if self.num_nonfinite_in_row >= self.cfg.train.max_nonfinite_steps:
            return "nonfinite"
        return "preempted" if self.stop_signal is not None else None

    def _stop_on_nonfinite(self) -> str:
        """Stops without publishing: ``latest`` stays on the last good checkpoint. The state is
        kept as ``step_N.quarantined-nonfinite`` for debugging, unless it is the very state the
        run resumed from (no step applied since); then the message says what that means."""
        limit, count = self.cfg.train.max_nonfinite_steps, self.num_nonfinite_in_row
        latest = self.ckpt.latest
        if self.resume_plan is not None and self.num_applied_steps == 0:
            source = self.resume_plan.source
            older = self.ckpt.older_than(source)
            back = f"resume={older.url} goes back one checkpoint" if older else (
                "there is no older checkpoint to go back to"
            )  # fmt: skip
            return (
                f"stopping: the first {count} optimizer steps after resuming from {source.tag} "
                f"had a non-finite loss (train.max_nonfinite_steps={limit}), yet its files match "
                "their checksums: the saved state itself, or this run's data or config, gives "
                f"non-finite losses, not a damaged file. Nothing saved or quarantined, latest "
                f"stays {source.tag}; {back}"
            )
        kept = ""
        try:
            kept = (
                f"; this state kept for debugging as {self.save_checkpoint(quarantine='nonfinite')}"
            )
        except CheckpointError as exc:
            kept = f"; this state not kept ({exc})"
        good = f"latest stays {latest}, the last good checkpoint" if latest else (
            "no checkpoint was published"
        )  # fmt: skip
        return (
            f"stopping: {count} optimizer steps in a row had a non-finite loss "
            f"(train.max_nonfinite_steps={limit}); {good}{kept}"
        )

    def train(self) -> TrainResult:
        cfg = self.cfg
        self._open_tracking()
        progress = Progress(
            self.is_main and cfg.train.progress, total=self.max_steps, initial=self.step,
            every_s=cfg.train.progress_every_s,
        )  # fmt: skip
        status, message = "completed", ""
        data_iter = iter(self.loader)
        timer = StepTimer()
        last_saved = self.step if self.resume_plan else -1  # a resumed step is on disk already
        try:
            while self.step < self.max_steps:
                t0 = time.perf_counter()
                batch = next(data_iter, None)
                if batch is None:
                    break
                t1 = time.perf_counter()
                out = self.train_step(batch)
                self.num_applied_steps += int(out.applied)
                timer.add(wait_s=t1 - t0, compute_s=time.perf_counter() - t1)
                self.step += 1
                extra, flush = self._step_extras(out, timer)
                lr, samples = float(self.engine.get_lr()[0]), self.step * cfg.data.global_batch_size
                self.metrics.record(
                    StepRecord(self.step, self.loader.epoch, lr, samples, out.loss, extra)
                )
                if flush:
                    self.metrics.flush()
                progress.update(self.step, self._progress_fields())
                stop = self._stop_reason()
                if stop == "nonfinite":
                    status, message = "failed", self._stop_on_nonfinite()
                    break
                every = cfg.checkpoint.every_steps
                # Not inside a run of non-finite steps: only a state whose last step applied is
                # published on schedule (a preemption still saves).
                periodic = every and self.step % every == 0 and out.applied
                if stop == "preempted" or periodic:
                    self.save_checkpoint()
                    last_saved = self.step
                if stop == "preempted":
                    status = "preempted"
                    message = (
                        f"preempted by signal {self.stop_signal}: checkpoint at step {self.step}"
                    )
                    break
            if status == "completed" and last_saved != self.step:
                self.save_checkpoint()
            self.metrics.flush()
        except BaseException:
            status = "failed"
            raise
        finally:
            progress.close()
            data_iter.close()
            self.tracker.end({"completed": "FINISHED", "preempted": "KILLED"}.get(status, "FAILED"))
            if self.node_metrics is not None:
                self.node_metrics.end(None)
        if message and self.is_main:
            log.warning(message)
        last = self.metrics.last_loss
        final = last if last is not None and math.isfinite(last) else None
        return TrainResult(
            status, self.step, final, str(self.run_dir), cfg.checkpoint.dir,
            self.mlflow_run_id or None, message,
        )  # fmt: skip

    def close(self) -> None:
        self.loader.close()
        for loader in self.val_loaders.values():
            loader.close()
