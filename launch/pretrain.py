"""The callable submitit runs on every task of a pretraining job; checkpointable and requeueable.

How preemption and time limits work (every rank, no lost work):

1. SLURM sends ``launch.signal`` (USR2) to every task ``launch.grace_s`` before the time limit,
   on preemption (``preempt_send_user_signal``), and SIGTERM on ``scancel``/kill.
2. The trainer (``avts_dist.train.run_training``) installs its own SIGUSR2/SIGTERM handlers on
   every rank; they replace submitit's, whose handler would requeue from rank 0 alone and exit
   before the other ranks saved. The ranks agree at the next step boundary, save the sharded
   checkpoint together and return ``status="preempted"``.
3. Only then does global rank 0 rewrite the submitted pickle (this callable with one more
   requeue counted) and call ``scontrol requeue``; the other ranks wait to be stopped by it.
   After ``launch.max_requeues`` requeues, or when the job was cancelled, the job ends as failed.
4. The requeued job runs this callable again with ``resume=auto``: the trainer resumes from the
   latest complete checkpoint and the same MLflow run (its id lives in ``<run.dir>``).

If a signal reaches submitit's own handler (before the trainer installed its handlers),
:meth:`PretrainJob.checkpoint` gives the same requeue: resume=auto, one requeue counted.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import submitit

from avts_dist.config import config_from_dict
from launch.jobs import job_state

log = logging.getLogger("avts.launch")

DEFAULT_TRAINER = "avts_dist.train:run_training"
# What `scontrol show job` says of a job that `scontrol requeue` took.
REQUEUED_STATES = ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED")


def resolve_callable(target: str):
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def export_distributed_env() -> dict[str, int]:
    """torch.distributed env (MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK) from submitit.

    ``CUDA_VISIBLE_DEVICES`` stays as SLURM set it: every GPU of the node (then the task's GPU is
    ordinal ``LOCAL_RANK``, as under torchrun) or only the task's own (``--gpus-per-task``/
    ``--gpu-bind``: ordinal 0). ``collectives.cuda_device_index`` picks the ordinal, so each
    task lands on a device that exists; narrowing it here while keeping ``LOCAL_RANK`` would
    point local ranks 1-7 at ordinals that do not exist.
    """
    # Lazy on purpose: `avts launch` and `avts study` import this module on the login node, where
    # nothing else here needs torch (collectives imports it); the job imports it anyway.
    from avts_dist.distributed.collectives import rendezvous_port

    env = submitit.JobEnvironment()
    # submitit keeps a MASTER_PORT it finds, else draws one in 20000-60000, which overlaps the
    # ephemeral ports: ours is drawn below them (collectives.rendezvous_port).
    os.environ.setdefault("MASTER_PORT", str(rendezvous_port(env.job_id)))
    dist_env = submitit.helpers.TorchDistributedEnvironment()
    dist_env.export(set_cuda_visible_devices=False, overwrite=True)
    os.environ["MASTER_ADDR"] = _reachable_address(dist_env.master_addr)
    return {
        "rank": dist_env.rank,
        "world_size": dist_env.world_size,
        "local_rank": dist_env.local_rank,
        "job_id": env.job_id,
    }


def _reachable_address(node: str) -> str:
    """The master node's address: its name when it resolves, else SLURM's NodeAddr for it.

    Node names need not be host names (several slurmd on one machine, clusters without DNS for
    node names); SLURM itself reaches the node by NodeAddr.
    """
    try:
        socket.getaddrinfo(node, None)
        return node
    except OSError:
        pass
    out = subprocess.run(
        ["scontrol", "show", "node", "-o", node], capture_output=True, text=True, timeout=30
    )
    for tok in out.stdout.split():
        if tok.startswith("NodeAddr="):
            return tok.split("=", 1)[1]
    return node


def _signal_from_env() -> signal.Signals:
    name = os.environ.get("AVTS_PREEMPT_SIGNAL", "USR2").upper().removeprefix("SIG")
    return getattr(signal, f"SIG{name}", signal.SIGUSR2)


def _forward_to_trainer(signum, frame) -> None:
    # A configured signal other than USR2/TERM: hand it to the trainer's USR2 handler.
    os.kill(os.getpid(), signal.SIGUSR2)


class PretrainJob(submitit.helpers.Checkpointable):
    """``PretrainJob(config_dict)()`` runs ``trainer(cfg)`` on this task and returns its result.

    ``trainer`` is a ``module:function`` taking a Config and returning an object with
    ``status``, ``step``, ``final_loss``, ``run_dir``, ``checkpoint_dir``, ``mlflow_run_id``
    (contract E); tests may pass a small stand-in with the same contract.
    """

    def __init__(
        self,
        config: dict[str, Any],
        *,
        trainer: str = DEFAULT_TRAINER,
        max_requeues: int = 3,
        num_requeues: int = 0,
    ) -> None:
        self.config = config
        self.trainer = trainer
        self.max_requeues = max_requeues
        self.num_requeues = num_requeues

    def _next(self) -> PretrainJob:
        config = dict(self.config)
        config["resume"] = "auto"
        return PretrainJob(
            config,
            trainer=self.trainer,
            max_requeues=self.max_requeues,
            num_requeues=self.num_requeues + 1,
        )

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission | None:
        if self.num_requeues >= self.max_requeues:
            return None  # submitit then ends the job as not requeued
        return submitit.helpers.DelayedSubmission(self._next())

    def __call__(self) -> Any:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        in_slurm = os.environ.get("SUBMITIT_EXECUTOR") == "slurm"
        info = export_distributed_env() if os.environ.get("SUBMITIT_EXECUTOR") else {}
        rank = info.get("rank", 0)
        sig = _signal_from_env()
        if sig not in (signal.SIGUSR2, signal.SIGTERM):
            signal.signal(sig, _forward_to_trainer)
        cfg = config_from_dict(self.config)
        log.info(
            "rank %s/%s: start (job %s, requeue %d of at most %d, resume=%s)",
            rank,
            info.get("world_size", 1),
            info.get("job_id", "-"),
            self.num_requeues,
            self.max_requeues,
            cfg.resume,
        )
        env_before = set(os.environ)
        try:
            result = resolve_callable(self.trainer)(cfg)
        finally:
            # As `avts train` does: the process groups end while the interpreter is whole (see
            # destroy). A job run in the calling process (`avts study --cluster debug`) leaves
            # neither a group nor the variables set for it (DeepSpeed's RANK, WORLD_SIZE, ...)
            # behind: the next job there starts its own group.
            from avts_dist.distributed.collectives import destroy

            destroy()
            for key in set(os.environ) - env_before:
                del os.environ[key]
        status = getattr(result, "status", "failed")
        log.info(
            "rank %s: trainer returned %s at step %s", rank, status, getattr(result, "step", "?")
        )
        if status == "completed":
            return result
        if status == "preempted" and in_slurm and self.num_requeues < self.max_requeues:
            if rank == 0:
                self._requeue(info["job_id"])
            else:
                self._wait_for_requeue(info["job_id"])
        step = getattr(result, "step", "?")
        if status == "preempted":
            raise RuntimeError(
                f"training stopped at step {step} (checkpoint saved) and was not requeued "
                f"({self.num_requeues} of at most {self.max_requeues} requeues used)"
            )
        raise RuntimeError(f"training ended with status {status!r} at step {step}")

    def _requeue(self, job_id: str) -> None:
        """Rank 0, after every rank saved: the next submission, then ``scontrol requeue``."""
        # scancel also signals (SIGTERM) but must not be undone: only a RUNNING job requeues.
        # A state scontrol could not tell (a busy controller) is no reason to give up: then
        # `scontrol requeue` decides, and it refuses a cancelled job.
        state = _job_state_settled(job_id)
        if state not in ("RUNNING", "UNKNOWN"):
            log.warning("not requeued: job %s is %s (cancelled or ending)", job_id, state)
            return
        paths = submitit.JobEnvironment().paths
        delayed = submitit.helpers.DelayedSubmission(self._next())
        old = submitit.helpers.DelayedSubmission.load(paths.submitted_pickle)
        delayed.set_timeout(old._timeout_min, max(0, self.max_requeues - self.num_requeues - 1))
        # The next submission must be in place before SLURM stops this task.
        backup = paths.submitted_pickle.with_suffix(".previous.pkl")
        shutil.copyfile(paths.submitted_pickle, backup)
        tmp = paths.submitted_pickle.with_suffix(".requeue.pkl")
        delayed.dump(tmp)
        os.replace(tmp, paths.submitted_pickle)
        # A cancelled job cannot be requeued: then the job ends here, its checkpoint saved.
        error = _scontrol_requeue(job_id)
        if error:
            os.replace(backup, paths.submitted_pickle)
            log.warning("not requeued: %s", error)
            return
        log.info("requeued job %s (%d of %d)", job_id, self.num_requeues + 1, self.max_requeues)
        # No result pickle: the requeued job writes the real one. SLURM stops every task now.
        sys.stdout.flush()
        os._exit(0)

    @staticmethod
    def _wait_for_requeue(job_id: str, max_wait_s: float = 120.0) -> None:
        """Other ranks: leave once rank 0 requeued the job (or it was cancelled), not before.

        Leaving first would be a bad exit that could stop rank 0 before it requeued.
        """
        deadline = time.monotonic() + max_wait_s
        while time.monotonic() < deadline:
            state = job_state(job_id).get("JobState")
            if state is None:
                time.sleep(0.5)  # scontrol could not tell (busy controller): not a requeue
                continue
            if state == "CANCELLED":
                return  # the job ends as failed; its checkpoint is saved
            if state != "RUNNING":
                # Requeued: no result pickle, the requeued job writes the real one.
                sys.stdout.flush()
                os._exit(0)
            time.sleep(0.5)


def _job_state_settled(job_id: str, attempts: int = 6, pause_s: float = 2.0) -> str:
    """The job's state, asking scontrol again while it cannot tell (a controller busy with a
    loaded cluster times out); ``UNKNOWN`` after ``attempts``."""
    for attempt in range(attempts):
        state = job_state(job_id).get("JobState")
        if state:
            return state
        if attempt + 1 < attempts:
            time.sleep(pause_s)
    return "UNKNOWN"


def _scontrol_requeue(job_id: str, attempts: int = 4, pause_s: float = 3.0) -> str:
    """``scontrol requeue``; "" once it took, else scontrol's last error.

    A refusal (the job was cancelled or is ending) is final; a failure while the job still runs
    (the controller did not answer in time) is tried again.
    """
    error = ""
    for attempt in range(attempts):
        try:
            out = subprocess.run(
                ["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60
            )
        except subprocess.TimeoutExpired:
            error = "scontrol requeue did not answer in 60 s"
        else:
            if out.returncode == 0:
                return ""
            error = (out.stderr or out.stdout).strip() or f"scontrol exit {out.returncode}"
        state = _job_state_settled(job_id)
        if state in REQUEUED_STATES:
            return ""  # it took, though scontrol's answer was lost
        if state not in ("RUNNING", "UNKNOWN"):
            return f"{error} (job is {state})"
        if attempt + 1 < attempts:
            log.warning("scontrol requeue failed (%s); trying again", error)
            time.sleep(pause_s)
    return error
