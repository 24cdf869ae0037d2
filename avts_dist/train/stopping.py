"""When a run stops early, and what it says: the stop policy of the training loop.

A run stops after the step in which it received a stop signal (``preempted``: it saves and
publishes a checkpoint first) or after ``train.max_nonfinite_steps`` optimizer steps in a row
with a non-finite loss (``nonfinite``: nothing is published, ``latest`` stays on the last good
checkpoint; :func:`nonfinite_stop_message` says what was kept and what to try).
"""

from __future__ import annotations

from collections.abc import Callable

from avts_dist.train.checkpoint import CheckpointError, CheckpointManager, ResumePlan

__all__ = ["nonfinite_stop_message", "stop_reason"]


def stop_reason(
    num_nonfinite_in_row: int, max_nonfinite_steps: int, stop_signal: int | None
) -> str | None:
    """``nonfinite`` or ``preempted`` when the run must stop after this step, else None."""
    if num_nonfinite_in_row >= max_nonfinite_steps:
        return "nonfinite"
    return "preempted" if stop_signal is not None else None


def nonfinite_stop_message(
    *,
    count: int,
    limit: int,
    ckpt: CheckpointManager,
    resume_plan: ResumePlan | None,
    num_applied_steps: int,
    save_quarantined: Callable[[], str],
) -> str:
    """Stops without publishing. The state is kept as ``step_N.quarantined-nonfinite`` for
    debugging (``save_quarantined`` saves it and returns its tag), unless it is the very state
    the run resumed from (no step applied since); then the message says what that means."""
    latest = ckpt.latest
    if resume_plan is not None and num_applied_steps == 0:
        source = resume_plan.source
        older = ckpt.older_than(source)
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
    try:
        kept = f"; this state kept for debugging as {save_quarantined()}"
    except CheckpointError as exc:
        kept = f"; this state not kept ({exc})"
    good = f"latest stays {latest}, the last good checkpoint" if latest else (
        "no checkpoint was published"
    )  # fmt: skip
    return (
        f"stopping: {count} optimizer steps in a row had a non-finite loss "
        f"(train.max_nonfinite_steps={limit}); {good}{kept}"
    )
