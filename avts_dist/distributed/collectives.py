"""The one home of ``torch.distributed`` calls (torchtitan ``distributed/utils.py``, lingua
``distributed.py``): process-group set-up, rank queries and the few collectives the rest of the
code needs. Everything here degrades to a no-op in a single process without a process group, so
losses and the trainer call the same functions at any world size.

``all_gather_with_grad`` is the piece the contrastive loss depends on. It is *exact*: the gradient
that reaches a rank's local embeddings is the plain sum, over every rank's loss, of that loss's
gradient with respect to them -- never divided or multiplied by the world size. The loss then
averages over its local anchors, and DeepSpeed/DDP's gradient averaging (sum over ranks / N)
turns that into the gradient of the global-batch mean: the same as one process on the whole
global batch (tested in ``tests/integration/test_gather_exactness.py``).

Backends: ``auto`` is ``cpu:gloo,cuda:nccl`` with CUDA (torch's multi-backend group: NCCL for GPU
tensors, gloo for CPU tensors, so a CPU-side collective such as an object broadcast stays legal
on a GPU cluster) and ``gloo`` without.
"""

from __future__ import annotations

import datetime
import gc
import os
import random
import socket
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

# torch >= 2.13 renamed the flat-tensor collectives; older releases (>= 2.4) have the old names.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

BACKENDS = ("auto", "gloo", "nccl", "cpu:gloo,cuda:nccl")

__all__ = [
    "BACKENDS",
    "DistContext",
    "agree_on_flags",
    "all_gather_no_grad",
    "all_gather_object",
    "all_gather_with_grad",
    "all_ranks_finite",
    "all_reduce_max",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "cuda_device_index",
    "destroy",
    "free_port",
    "get_local_rank",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_dist",
    "is_main_process",
    "resolve_backend",
    "set_determinism",
]


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str


def is_dist() -> bool:
    """True when a process group is up (collectives talk to other ranks, or to a group of 1)."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    if is_dist():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def get_world_size() -> int:
    if is_dist():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main_process() -> bool:
    return get_rank() == 0


def free_port() -> int:
    """A free TCP port on the loopback interface (for a local rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_backend(backend: str = "auto") -> str:
    """The process-group backend string for ``deepspeed.backend``; ValueError if unusable here."""
    if backend not in BACKENDS:
        raise ValueError(f"distributed backend must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if "nccl" in backend and not torch.cuda.is_available():
        raise ValueError(f"distributed backend {backend!r} needs CUDA, and none is available")
    return backend


def _has_nccl() -> bool:
    return is_dist() and "nccl" in dist.get_backend()


def _has_gloo() -> bool:
    return is_dist() and "gloo" in dist.get_backend()


def cuda_device_index(local_rank: int, num_visible: int) -> int:
    """The CUDA ordinal of a task: its local rank when every GPU of the node is visible
    (torchrun, plain srun), 0 when its launcher narrowed ``CUDA_VISIBLE_DEVICES`` to one GPU
    (SLURM's ``--gpus-per-task``/``--gpu-bind``): always a device that exists."""
    if num_visible < 1:
        raise RuntimeError("the nccl backend needs a visible CUDA device, and this task sees none")
    return local_rank % num_visible


def _device_for(backend: str, local_rank: int) -> torch.device:
    if "nccl" not in backend:
        return torch.device("cpu")
    index = cuda_device_index(local_rank, torch.cuda.device_count())
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def _export_slurm_env() -> None:
    """``srun python -m avts_dist train`` sets no RANK/WORLD_SIZE: derive them and the rendezvous
    from SLURM's task variables (SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID, the first
    node of the job; a port drawn from the job id, as submitit does), or fail with the fix."""
    num_tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", "1") or 1)
    if num_tasks <= 1 or "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    try:
        # Lazy on purpose: only srun-started ranks need submitit (its SLURM node-list parser).
        from submitit.slurm.slurm import SlurmJobEnvironment

        job = SlurmJobEnvironment()
        values = {
            "RANK": job.global_rank,
            "WORLD_SIZE": num_tasks,
            "LOCAL_RANK": job.local_rank,
            "MASTER_ADDR": job.hostnames[0],
            "MASTER_PORT": random.Random(job.job_id).randint(20000, 60000),
        }
    except Exception as exc:
        raise RuntimeError(
            f"started by srun as {num_tasks} tasks without RANK/WORLD_SIZE, and they could not be "
            f"derived from SLURM's variables ({exc}); export RANK, WORLD_SIZE, LOCAL_RANK, "
            "MASTER_ADDR and MASTER_PORT, or use `avts launch pretrain`"
        ) from None
    for key, value in values.items():
        os.environ.setdefault(key, str(value))


def set_determinism(deterministic: bool, device: torch.device) -> None:
    """Deterministic kernels, or cuDNN's autotuner when determinism is not asked for."""
    if device.type == "cuda":
        if deterministic:
            # cuBLAS reads it when its handle is made, at the first matmul (after this).
            value = os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            if value not in (":4096:8", ":16:8"):
                raise ValueError(
                    f"train.deterministic=true on CUDA needs CUBLAS_WORKSPACE_CONFIG=:4096:8 or "
                    f":16:8, not {value!r} (or set train.deterministic=false)"
                )
        torch.backends.cudnn.deterministic = deterministic
        torch.backends.cudnn.benchmark = not deterministic
    if deterministic:
        # warn_only: an op without a deterministic kernel warns once instead of stopping a run.
        torch.use_deterministic_algorithms(True, warn_only=True)


def init_distributed(backend: str = "auto", timeout_s: float = 1800.0) -> DistContext:
    """Joins the process group described by the launcher's environment.

    ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` come from torchrun,
    the DeepSpeed launcher, the submitit/SLURM launch layer or, under a bare ``srun``, from
    SLURM's task variables. With none of them set this is a single process: it still gets a
    process group of one (an in-memory store, no port), so that DeepSpeed, which insists on an
    initialised group, and the collectives below run unchanged. Calling it again returns the
    existing context.
    """
    backend = resolve_backend(backend)
    if is_dist():
        actual = dist.get_backend()
        local_rank = get_local_rank()
        return DistContext(
            dist.get_rank(),
            dist.get_world_size(),
            local_rank,
            _device_for(actual, local_rank),
            actual,
        )
    _export_slurm_env()
    local_rank = get_local_rank()
    timeout = datetime.timedelta(seconds=timeout_s)
    device = _device_for(backend, local_rank)
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise RuntimeError(
                f"RANK/WORLD_SIZE are set but {', '.join(missing)} is not: cannot join the group"
            )
        kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, init_method="env://", timeout=timeout, **kwargs)
    else:
        dist.init_process_group(
            backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
        )
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def destroy() -> None:
    """Ends this process's process groups while the interpreter is still whole.

    What a finished run no longer references is collected first (an engine's cycles hold
    groups), and with DeepSpeed up the groups go through ``deepspeed.comm``, which also drops
    DeepSpeed's own references to them (``deepspeed.utils.groups``). A group destroyed only in
    interpreter teardown can abort a finished rank ("terminate called without an active
    exception", pytorch#190489). torch itself still binds the world group as a default argument
    in modules imported after ``init_process_group`` (``torch.distributed.nn.functional``, via
    ``use_deterministic_algorithms``); those references are out of reach here.
    """
    if not is_dist():
        return
    gc.collect()
    ds_comm = sys.modules.get("deepspeed.comm")
    if ds_comm is not None and ds_comm.is_initialized():
        ds_comm.destroy_process_group()
    else:
        dist.destroy_process_group()


def barrier() -> None:
    if is_dist() and dist.get_world_size() > 1:
        if _has_nccl() and not _has_gloo():
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def _world() -> int:
    return dist.get_world_size() if is_dist() else 1


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward sums every rank's gradient for this rank's slice.

    The backward is a reduce-scatter with SUM on NCCL (all_reduce + slice on gloo, which has no
    reduce_scatter). No 1/N or N factor: averaging belongs to the optimizer side (DeepSpeed).
    """

    @staticmethod
    def forward(ctx, local_BD: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        world = dist.get_world_size()
        ctx.rank = dist.get_rank()
        ctx.rows = local_BD.shape[0]
        out = local_BD.new_empty((world * local_BD.shape[0], *local_BD.shape[1:]))
        _all_gather_flat(out, local_BD.contiguous())
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad_out = grad_out.contiguous()
        if grad_out.is_cuda and _has_nccl():
            grad_local = grad_out.new_empty((ctx.rows, *grad_out.shape[1:]))
            _reduce_scatter_flat(grad_local, grad_out, op=dist.ReduceOp.SUM)
            return grad_local
        summed = grad_out.clone()
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.rows
        return summed[start : start + ctx.rows]


def all_gather_with_grad(local_BD: torch.Tensor) -> torch.Tensor:
    """Concatenates every rank's ``[b, ...]`` tensor along dim 0 (rank order), with exact grads.

    Every rank must pass the same shape. Without a group (or with one rank) it returns the input.
    The backward communicates in the input's dtype: pass fp32 for an fp32 gradient reduction.
    """
    if _world() == 1:
        return local_BD
    return _AllGatherWithGrad.apply(local_BD)


def all_gather_no_grad(local_BD: torch.Tensor) -> torch.Tensor:
    """The naive gather (OpenCLIP without ``gather_with_grad``): other ranks' rows are constants,
    only this rank's slice keeps its graph. Gradients from other ranks' losses are lost, so the
    result is *not* the single-process gradient; kept for the ``loss.gather_with_grad=false``
    ablation and to show the difference in the exactness test."""
    world = _world()
    if world == 1:
        return local_BD
    out = local_BD.new_empty((world * local_BD.shape[0], *local_BD.shape[1:]))
    _all_gather_flat(out, local_BD.detach().contiguous())
    rank, rows = dist.get_rank(), local_BD.shape[0]
    return torch.cat([out[: rank * rows], local_BD, out[(rank + 1) * rows :]], dim=0)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """A new tensor holding the sum over ranks (the input is left as it was)."""
    out = t.detach().clone()
    if _world() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    out = t.detach().clone()
    if _world() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


def agree_on_flags(flags: torch.Tensor) -> list[float]:
    """Every rank's health flags combined (max over ranks), read on the host.

    ``flags`` is a small vector on the engine's device (e.g. [non-finite loss, stop requested]).
    One all-reduce on that device and one host sync: the trainer's only sync per optimizer step,
    and after it every rank takes the same branch.
    """
    return all_reduce_max(flags.float()).tolist()


def all_ranks_finite(t: torch.Tensor) -> bool:
    """True only if ``t`` is finite on every rank: all ranks take the same branch after it.

    One all-reduce and one host sync; call it where a decision is needed, not for logging.
    """
    num_bad = (~torch.isfinite(t.detach())).sum().to(torch.float32).reshape(1)
    return bool(all_reduce_sum(num_bad).item() == 0)


# Object collectives pickle into a byte tensor; torch sends it on CPU through gloo when the
# group has gloo (a multi-backend group included), else on the current CUDA device (NCCL only).


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (picklable objects: run ids, paths, decisions)."""
    if _world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (small picklable objects)."""
    if _world() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
