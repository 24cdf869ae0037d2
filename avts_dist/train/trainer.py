"""The pretraining loop: loader -> model -> loss -> DeepSpeed step, with validation, the
curriculum, checkpoints and tracking on their schedules.

Its parts live beside it: what a batch means per objective (``train/objectives.py``), its
counters (``train/trainer_state.py``), the stop policy (``train/stopping.py``), checkpoints
(``train/checkpoint/``), validation (``train/validation.py``) and the run's tracking
(``tracking/session.py``).
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

from avts_dist.config import Config, redacted_config_dict
from avts_dist.curriculum import Curriculum
from avts_dist.data import build_loader
from avts_dist.distributed import collectives as C
from avts_dist.distributed.engine import (
    build_ds_config,
    initialize_engine,
    optimizer_step,
)
from avts_dist.export import build_initial_model
from avts_dist.losses import build_loss, reduce_metrics
from avts_dist.tracking import (
    MetricsLogger,
    NoTracking,
    Progress,
    StepRecord,
    StepTimer,
    open_tracking,
    progress_fields,
    sum_over_ranks,
    telemetry_fields,
)
from avts_dist.train.accumulation import accumulate_gradients
from avts_dist.train.batch import micro_batches, to_device
from avts_dist.train.checkpoint import (
    CheckpointError,
    CheckpointManager,
    ResumePlan,
    RNGState,
    Stateful,
    tag_for,
)
from avts_dist.train.hooks import TrainHooks
from avts_dist.train.objectives import forward_loss
from avts_dist.train.stopping import nonfinite_stop_message, stop_reason
from avts_dist.train.trainer_state import TrainerState
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
    terms: dict[str, torch.Tensor]  # the loss's output (train/accumulation.py: which batch)
    loss: torch.Tensor | None  # mean loss over the micro-batches, on the device; None if skipped
    applied: bool


def _counter(name: str) -> property:
    """``trainer.<name>``, read and written in ``trainer.state`` (its resumable counters)."""
    return property(
        lambda self: getattr(self.state, name), lambda self, v: setattr(self.state, name, v)
    )


class Trainer:
    """Builds every component for this rank; ``train()`` runs to the end, a signal or a failure."""

    step = _counter("step")
    num_skipped_steps = _counter("num_skipped_steps")
    num_nonfinite_in_row = _counter("num_nonfinite_in_row")
    val_metrics = _counter("val_metrics")

    def __init__(self, cfg: Config, ctx: C.DistContext, hooks: TrainHooks | None = None) -> None:
        self.cfg, self.ctx, self.hooks = cfg, ctx, hooks or TrainHooks()
        self.rank, self.world_size, self.is_main = ctx.rank, ctx.world_size, ctx.rank == 0
        self.run_dir = Path(cfg.run.dir)
        self.stop_signal: int | None = None
        self.state = TrainerState(global_batch_size=cfg.data.global_batch_size)
        self.num_applied_steps = 0  # optimizer steps applied by this process (not resumed ones)
        self.mlflow_run_id = ""
        self.tracker = NoTracking()
        self.node_metrics = None  # another node's system metrics (multi-node runs)
        self.last_saved = -1  # the step of the newest checkpoint on disk (a resumed one is)
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
        views = cfg.train.objective == "video_ssl"
        self.loader = build_loader(
            cfg.data, rank=self.rank, world_size=self.world_size, pin_memory=pin, views=views
        )
        self.val_loaders = {}
        if cfg.train.val_every_steps > 0:
            self.val_loaders = build_val_loaders(
                cfg.data, rank=self.rank, world_size=self.world_size, pin_memory=pin, views=views
            )
        self.max_steps = self._run_length()
        groups = C.gather_groups(cfg.loss.gather, ctx)
        if groups is not None and self.is_main:
            log.info(
                "loss.gather=%s: within %d ranks per node, then across %d nodes",
                cfg.loss.gather, groups.local_world_size, groups.num_nodes,
            )  # fmt: skip
        self.loss_fn = build_loss(cfg.loss, cfg.train.objective, gather_groups=groups)
        self.curriculum = Curriculum(
            dataclasses.replace(cfg.curriculum, enabled=False) if views else cfg.curriculum
        )
        if views and self.is_main:
            log.info("train.objective=video_ssl: the curriculum does not apply and is ignored")
        plan = self.resume_plan
        if plan is not None:
            plan.check_objective(cfg.train.objective)
        ds_config = build_ds_config(
            cfg.deepspeed, cfg.optim, global_batch_size=cfg.data.global_batch_size,
            world_size=self.world_size, total_steps=self.max_steps,
            load_universal=plan is not None and plan.universal, use_cuda=ctx.device.type == "cuda",
        )  # fmt: skip
        model = build_initial_model(cfg.model, cfg.train.objective)
        self.engine = initialize_engine(model, ds_config, backend=ctx.backend)
        self.device = self.engine.device
        self.micro_steps = cfg.deepspeed.grad_accum_steps
        self.metrics = MetricsLogger(
            self.run_dir / "metrics.jsonl", device=self.device, world_size=self.world_size,
            is_main=self.is_main, total_steps=self.max_steps,
        )  # fmt: skip
        if plan is not None:
            self._resume(plan)
            self.last_saved = self.step
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

    # ---- state: each resumable part under its checkpoint key ----

    def checkpoint_states(self) -> dict[str, Stateful]:
        self.state.epoch = self.loader.epoch
        return {
            "trainer": self.state, "curriculum": self.curriculum, "loader": self.loader,
            "rng": RNGState(),
        }  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return {key: part.state_dict() for key, part in self.checkpoint_states().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, part in self.checkpoint_states().items():
            part.load_state_dict(state[key])

    def _resume(self, plan: ResumePlan) -> None:
        """Model, optimizer and LR schedule (DeepSpeed), then each state from its key."""
        client, rng_restored = self.ckpt.load(self.engine, plan, self.checkpoint_states())
        saved_model = client.get("config", {}).get("model")
        if saved_model is not None and saved_model != dataclasses.asdict(self.cfg.model):
            raise ValueError("the checkpoint's model config differs from this run's model.* keys")
        self.mlflow_run_id = client.get("mlflow_run_id") or ""
        if not rng_restored:
            # A new world size has no per-rank RNG to continue: derive it from the step.
            torch.manual_seed(self.cfg.data.seed + 1_000_003 * self.step + self.rank)

    # ---- one step ----

    def _forward_loss(self, batch: dict[str, Any], **loss_kwargs) -> dict[str, torch.Tensor]:
        return forward_loss(
            self.engine, self.loss_fn, batch, objective=self.cfg.train.objective,
            rank=self.rank, world_size=self.world_size, **loss_kwargs,
        )  # fmt: skip

    def train_step(self, batch: dict[str, Any]) -> StepOutput:
        """One optimizer step over this rank's batch (``grad_accum_steps`` micro-batches).

        The health flags (a non-finite loss here, a stop signal here) stay on the device and are
        agreed by every rank in one all-reduce: one host sync per step. A non-finite loss on any
        rank skips the update on every rank (see ``engine.optimizer_step``).
        """
        parts = micro_batches(to_device(batch, self.device), self.micro_steps)
        hook = self.hooks.on_loss
        acc = accumulate_gradients(
            self.engine, self.loss_fn, parts, objective=self.cfg.train.objective,
            rank=self.rank, world_size=self.world_size,
            negatives_scope=self.cfg.loss.negatives_scope,
            on_loss=None if hook is None else lambda loss: hook(self.step + 1, loss),
            weights=self.curriculum.loss_weights or None, step=self.step,
        )  # fmt: skip
        nonfinite, losses, terms = acc.nonfinite, acc.losses, acc.terms
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
        t = open_tracking(
            self.cfg, self.metrics, run_dir=self.run_dir, step=self.step,
            run_id=self.mlflow_run_id,
            resumed_from=self.resume_plan.source.url if self.resume_plan else "",
            rank=self.rank, local_rank=self.ctx.local_rank, world_size=self.world_size,
        )  # fmt: skip
        self.tracker, self.mlflow_run_id, self.node_metrics = t.tracker, t.run_id, t.node_metrics

    def save_checkpoint(self, *, quarantine: str = "") -> str:
        """Saves (and publishes) this state; ``quarantine``: keeps it under a quarantined name
        instead, never ``latest`` (see ``CheckpointManager.save``)."""
        self.metrics.flush()
        # What COMPLETE records beside its manifest, read without opening a file (the ZeRO
        # stage of a resume at another world size, the objective check of a resume).
        meta = {
            "zero_stage": self.cfg.deepspeed.zero_stage,
            "global_batch_size": self.cfg.data.global_batch_size,
            "mlflow_run_id": self.mlflow_run_id, "epoch": self.loader.epoch,
            "objective": self.cfg.train.objective,
        }  # fmt: skip
        extra = {
            # Rank 0's tracker knows the id once the server has created the run (maybe late).
            "mlflow_run_id": self.tracker.run_id or self.mlflow_run_id,
            # Redacted: checkpoints are copied and uploaded; credentials come from the user again.
            "config": redacted_config_dict(self.cfg),
        }
        tag = self.ckpt.save(
            self.engine, self.step, self.checkpoint_states(), meta, extra=extra,
            quarantine=quarantine,
        )  # fmt: skip
        if not quarantine:
            url = f"{self.cfg.checkpoint.dir.rstrip('/')}/{tag}"
            self.tracker.log_checkpoint(url, self.step, self.ckpt.last_save_s)
        if self.ckpt.uploader is not None:
            # The step was blocked for last_save_s (checkpoint/save_s); the upload goes on.
            self.tracker.log_metrics(self.ckpt.upload_stats.as_metrics(), step=self.step)
        return tag

    def _finish_uploads(self, timeout_s: float) -> str:
        """Waits (at most ``timeout_s``) for a checkpoint upload in flight; returns what the
        newest checkpoint is, for the run's last message (rank 0 knows it)."""
        done = self.ckpt.finish(timeout_s)
        latest = self.ckpt.latest
        if not done:
            return f"an upload still in flight after {timeout_s:.0f}s; latest is {latest}"
        if latest == tag_for(self.step):
            return f"checkpoint at step {self.step}"
        return f"the checkpoint of step {self.step} was not published; latest is {latest}"

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

    def _stop_or_save(self, out: StepOutput) -> tuple[str, str] | None:
        """The stop policy (train/stopping.py) and the checkpoint schedule after a step;
        ``(status, message)`` when the run stops here."""
        limit = self.cfg.train.max_nonfinite_steps
        stop = stop_reason(self.num_nonfinite_in_row, limit, self.stop_signal)
        if stop == "nonfinite":
            return "failed", nonfinite_stop_message(
                count=self.num_nonfinite_in_row, limit=limit, ckpt=self.ckpt,
                resume_plan=self.resume_plan, num_applied_steps=self.num_applied_steps,
                save_quarantined=lambda: self.save_checkpoint(quarantine="nonfinite"),
            )  # fmt: skip
        every = self.cfg.checkpoint.every_steps
        # Not inside a run of non-finite steps: only a state whose last step applied is
        # published on schedule (a preemption still saves).
        if stop == "preempted":
            # Within checkpoint.preempt_wait_s: the upload in flight, this save, its upload.
            t0, bound = time.monotonic(), self.cfg.checkpoint.preempt_wait_s
            head = f"preempted by signal {self.stop_signal}"
            if not self.ckpt.finish(bound):
                return "preempted", (
                    f"{head}: no new checkpoint, an upload still in flight after {bound:.0f}s; "
                    f"latest is {self.ckpt.latest}"
                )
            self.save_checkpoint()
            self.last_saved = self.step
            left = max(0.0, bound - (time.monotonic() - t0))
            return "preempted", f"{head}: {self._finish_uploads(left)}"
        if every and self.step % every == 0 and out.applied:
            self.save_checkpoint()
            self.last_saved = self.step
        return None

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
                progress.update(self.step, progress_fields(self.metrics, self.tracker))
                stopped = self._stop_or_save(out)
                if stopped is not None:
                    status, message = stopped
                    break
            if status == "completed" and self.last_saved != self.step:
                self.save_checkpoint()
            if status in ("completed", "failed"):  # failed: a non-finite stop saved its state
                outcome = self._finish_uploads(cfg.checkpoint.upload_timeout_s)
                if status == "completed" and self.is_main and "checkpoint at" not in outcome:
                    raise CheckpointError(f"the run ended, but {outcome}")
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
        # ZeRO's gradient hooks live in autograd's C++ graph and hold the optimizer, hence the
        # engine and its process groups: DeepSpeed's own release removes them.
        self.engine.destroy()
