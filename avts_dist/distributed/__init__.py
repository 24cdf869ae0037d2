"""avts_dist.distributed: process groups and collectives (``collectives``); the DeepSpeed
engine lives in ``avts_dist.distributed.engine`` and is imported from there (not here, so that
importing the collectives never imports deepspeed)."""

from avts_dist.distributed.collectives import (
    DistContext,
    agree_on_flags,
    all_gather_no_grad,
    all_gather_object,
    all_gather_with_grad,
    all_ranks_finite,
    all_reduce_max,
    all_reduce_sum,
    barrier,
    broadcast_object,
    destroy,
    free_port,
    get_local_rank,
    get_rank,
    get_world_size,
    init_distributed,
    is_dist,
    is_main_process,
    resolve_backend,
)

__all__ = [
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
    "destroy",
    "free_port",
    "get_local_rank",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_dist",
    "is_main_process",
    "resolve_backend",
]
