"""What a checkpoint holds beside DeepSpeed's shards: every resumable part of a run is a
:class:`Stateful` under a fixed key (torchtitan's ``states``), composed into the client state.

Keys (:data:`STATE_KEYS`): ``trainer`` (the trainer's counters), ``curriculum``, ``loader``
(global: identical on every rank and valid at any world size) and ``rng`` (rank 0's generators;
every rank also writes its own ``rng_rank_*.pt``). Beside them: ``format_version``,
``world_size``, and what the caller adds (``mlflow_run_id``, ``config``). Model, optimizer and
LR scheduler go through DeepSpeed's sharded checkpoint.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from avts_dist.train.checkpoint.refs import CHECKPOINT_FORMAT_VERSION, CheckpointError

__all__ = [
    "STATE_KEYS",
    "RNGState",
    "Stateful",
    "compose_client_state",
    "get_rng_state",
    "restore_states",
    "set_rng_state",
]

STATE_KEYS = ("trainer", "curriculum", "loader", "rng")


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def get_rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class RNGState:
    """This process's random generators (python, numpy, torch, CUDA) as a :class:`Stateful`."""

    def state_dict(self) -> dict[str, Any]:
        return get_rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_rng_state(state)


def _check_keys(states: Mapping[str, Stateful]) -> None:
    if tuple(states) != STATE_KEYS:
        raise ValueError(f"checkpoint states must be {STATE_KEYS}, got {tuple(states)}")


def compose_client_state(
    states: Mapping[str, Stateful], *, world_size: int, extra: Mapping[str, Any]
) -> dict[str, Any]:
    """The client state of a save: each state under its key, versioned, plus ``extra``."""
    _check_keys(states)
    client: dict[str, Any] = {"format_version": CHECKPOINT_FORMAT_VERSION}
    client.update({key: state.state_dict() for key, state in states.items()})
    return {**client, **extra, "world_size": world_size}


def restore_states(
    states: Mapping[str, Stateful],
    client: Mapping[str, Any],
    *,
    world_size: int,
    rng_file: Path | None = None,
) -> bool:
    """Puts ``client`` (from :func:`compose_client_state`) back into ``states``; returns whether
    the random generators were restored: from this rank's ``rng_file``, at the world size the
    state was saved at. At another world size there is no per-rank state to continue and the
    caller reseeds."""
    _check_keys(states)
    version = client.get("format_version")
    if version != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint format_version {version!r}; this code reads {CHECKPOINT_FORMAT_VERSION}"
        )
    for key in ("trainer", "curriculum", "loader"):
        states[key].load_state_dict(client[key])
    if client.get("world_size") == world_size and rng_file is not None and rng_file.is_file():
        # Our own file (numpy's state is a tuple of arrays): weights_only=False is needed.
        states["rng"].load_state_dict(torch.load(rng_file, weights_only=False))
        return True
    return False
