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
``hierarchical_all_gather_with_grad`` gives the same tensor and gradients in two levels, within
each node and then across nodes (``loss.gather``; docs/scale.md, "The gather at 512 GPUs").

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
    "GatherGroups",
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
    "gather_groups",
    "get_local_rank",
    "get_local_world_size",
    "get_rank",
    "get_world_size",
    "hierarchical_all_gather_with_grad",
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
    # Ranks per node (the launcher's LOCAL_WORLD_SIZE; the world size when it sets none).
    local_world_size: int = 1

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))


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


def get_local_world_size() -> int:
    """Ranks on this node: ``LOCAL_WORLD_SIZE`` (torchrun, submitit, the local launcher), else
    every rank (one node)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", 0) or get_world_size())


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
            "LOCAL_WORLD_SIZE": num_tasks // max(1, job.num_nodes),
            "MASTER_ADDR": job.hostnames[0],
            "MASTER_PORT": rendezvous_port(job.job_id),
        }
    except Exception as exc:
        raise RuntimeError(
            f"started by srun as {num_tasks} tasks without RANK/WORLD_SIZE, and they could not be "
            f"derived from SLURM's variables ({exc}); export RANK, WORLD_SIZE, LOCAL_RANK, "
            "MASTER_ADDR and MASTER_PORT, or use `avts launch pretrain`"
        ) from None
    for key, value in values.items():
        os.environ.setdefault(key, str(value))


# Below Linux's default ephemeral range (net.ipv4.ip_local_port_range, 32768-60999): a port in
# it can be held by any outgoing connection on the master node (slurmd's RPCs, a client, the last
# job's gloo pairs), and rank 0's store then fails with EADDRINUSE. submitit's own draw is
# 20000-60000; a fresh-clone run of the 4-node test hit exactly that (port 52330).
RENDEZVOUS_PORTS = (20000, 32767)


def rendezvous_port(job_id: str) -> int:
    """The job's MASTER_PORT: drawn from its id, so every task of the job draws the same one."""
    return random.Random(str(job_id)).randint(*RENDEZVOUS_PORTS)


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
            get_local_world_size(),
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
    return DistContext(
        dist.get_rank(), dist.get_world_size(), local_rank, device, backend, get_local_world_size()
    )


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
    _GATHER_GROUPS.clear()
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


def _gather_rows(local_BD: torch.Tensor, size: int, group: Any = None) -> torch.Tensor:
    """The ``size`` members' tensors of ``group`` (None: the world) concatenated in group-rank
    order."""
    out = local_BD.new_empty((size * local_BD.shape[0], *local_BD.shape[1:]))
    _all_gather_flat(out, local_BD.contiguous(), group=group)
    return out


def _reduce_scatter_rows(full_BD: torch.Tensor, size: int, index: int, group: Any = None):
    """The sum over ``group``'s members of their ``full_BD``, sliced to member ``index``'s rows:
    a reduce-scatter with SUM on NCCL, all_reduce + slice on gloo (which has no reduce_scatter).
    """
    full_BD = full_BD.contiguous()
    rows = full_BD.shape[0] // size
    if full_BD.is_cuda and _has_nccl():
        part = full_BD.new_empty((rows, *full_BD.shape[1:]))
        _reduce_scatter_flat(part, full_BD, op=dist.ReduceOp.SUM, group=group)
        return part
    summed = full_BD.clone()
    dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group)
    return summed[index * rows : (index + 1) * rows]


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward sums every rank's gradient for this rank's slice.

    No 1/N or N factor: averaging belongs to the optimizer side (DeepSpeed).
    """

    @staticmethod
    def forward(ctx, local_BD: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.rank, ctx.world = dist.get_rank(), dist.get_world_size()
        return _gather_rows(local_BD, ctx.world)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _reduce_scatter_rows(grad_out, ctx.world, ctx.rank)


def all_gather_with_grad(local_BD: torch.Tensor) -> torch.Tensor:
    """Concatenates every rank's ``[b, ...]`` tensor along dim 0 (rank order), with exact grads.

    Every rank must pass the same shape. Without a group (or with one rank) it returns the input.
    The backward communicates in the input's dtype: pass fp32 for an fp32 gradient reduction.
    """
    if _world() == 1:
        return local_BD
    return _AllGatherWithGrad.apply(local_BD)


@dataclass(frozen=True)
class GatherGroups:
    """The two levels of the hierarchical gather, for this rank: ``intra`` holds the ranks of
    its node, ``inter`` the ranks of its local rank on every node (one per node)."""

    intra: Any
    inter: Any
    local_rank: int
    local_world_size: int
    node: int
    num_nodes: int


# Every group made here, so that destroy() drops them with the rest.
_GATHER_GROUPS: list[GatherGroups] = []


def _layout_error(table: list[tuple[int, int, int]]) -> str | None:
    """Why ranks ``(rank, local_rank, local_world_size)`` are not nodes of equal size with
    consecutive ranks (rank = node x local world size + local rank), or None."""
    sizes = {lws for _, _, lws in table}
    if len(sizes) != 1:
        return f"ranks report different LOCAL_WORLD_SIZE values {sorted(sizes)}"
    lws = sizes.pop()
    if lws < 1 or len(table) % lws:
        return f"world size {len(table)} is not a multiple of LOCAL_WORLD_SIZE={lws}"
    bad = [r for r, lr, _ in table if lr != r % lws]
    return f"ranks {bad[:4]} do not have LOCAL_RANK = RANK mod {lws}" if bad else None


def gather_groups(mode: str, ctx: DistContext) -> GatherGroups | None:
    """The groups of ``loss.gather=mode`` (``flat``, ``hierarchical``, ``auto``), or None for
    the flat gather: at one node, at one rank per node, or with ``flat``. Collective for every
    mode but ``flat``: every rank calls it once, at set-up, with the same mode."""
    if mode not in ("flat", "hierarchical", "auto"):
        raise ValueError(f"loss.gather must be flat, hierarchical or auto, got {mode!r}")
    if mode == "flat" or _world() == 1:
        return None
    # One table on every rank, so every rank takes the same branch (new_group is collective).
    table = all_gather_object((ctx.rank, ctx.local_rank, ctx.local_world_size))
    problem = _layout_error(table)
    if problem is not None:
        if mode == "hierarchical":
            raise ValueError(f"loss.gather=hierarchical needs equal nodes: {problem}")
        return None
    lws = table[0][2]
    num_nodes = len(table) // lws
    if num_nodes == 1 or lws == 1:
        return None
    # Every rank creates every group, in the same order: the nodes', then the local ranks'.
    intra = [dist.new_group(list(range(n * lws, (n + 1) * lws))) for n in range(num_nodes)]
    inter = [dist.new_group(list(range(lr, len(table), lws))) for lr in range(lws)]
    node, local_rank = divmod(ctx.rank, lws)
    groups = GatherGroups(intra[node], inter[local_rank], local_rank, lws, node, num_nodes)
    _GATHER_GROUPS.append(groups)
    return groups


class _HierarchicalAllGatherWithGrad(torch.autograd.Function):
    """Within the node, then across nodes: the flat gather's rank order, since rank = node x
    local world size + local rank. The backward is the adjoint, in reverse: reduce-scatter
    across nodes, then within the node."""

    @staticmethod
    def forward(ctx, local_BD: torch.Tensor, groups: GatherGroups) -> torch.Tensor:  # type: ignore[override]
        ctx.groups = groups
        node_BD = _gather_rows(local_BD, groups.local_world_size, groups.intra)
        return _gather_rows(node_BD, groups.num_nodes, groups.inter)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        g = ctx.groups
        node_grad = _reduce_scatter_rows(grad_out, g.num_nodes, g.node, g.inter)
        return _reduce_scatter_rows(node_grad, g.local_world_size, g.local_rank, g.intra), None


def hierarchical_all_gather_with_grad(
    local_BD: torch.Tensor, groups: GatherGroups | None
) -> torch.Tensor:
    """:func:`all_gather_with_grad` in two levels (``groups`` from :func:`gather_groups`; None:
    the flat gather): the same tensor, bitwise, and the same gradients."""
    if groups is None:
        return all_gather_with_grad(local_BD)
    return _HierarchicalAllGatherWithGrad.apply(local_BD, groups)


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
