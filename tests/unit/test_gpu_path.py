"""The GPU path, pinned on CPU where a CPU can pin it: the DeepSpeed config for CUDA, bf16
autocast with fp32 gradients and BatchNorm, one existing device per task, srun's environment,
the batch crossing to the device, and determinism settings."""

from __future__ import annotations

import os

import pytest
import torch

from avts_dist.config import DeepSpeedConfig, OptimConfig, load_config
from avts_dist.distributed import collectives as C
from avts_dist.distributed.engine import build_ds_config
from avts_dist.train.batch import micro_batches, normalize_video, to_device


def cuda_config(**ds) -> dict:
    return build_ds_config(
        DeepSpeedConfig(**ds), OptimConfig(), global_batch_size=64, world_size=8,
        total_steps=100, use_cuda=True,
    )  # fmt: skip


def test_cuda_config_needs_no_jit_op_and_keeps_fp32_gradients():
    cfg = cuda_config(zero_stage=1, precision="bf16")
    opt = cfg["optimizer"]
    # torch's fused AdamW kernel instead of DeepSpeed's JIT-compiled FusedAdam.
    assert opt["type"] == "AdamW" and opt["params"]["torch_adam"] is True
    assert opt["params"]["fused"] is True
    assert cfg["data_types"] == {"grad_accum_dtype": "fp32"}
    assert cfg["communication_data_type"] == "fp32"
    assert cfg["torch_autocast"] == {
        "enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": [],
    }  # fmt: skip
    assert "bf16" not in cfg and "fp16" not in cfg  # DeepSpeed's weight-casting modes
    assert cfg["zero_optimization"] == {"stage": 1}  # GPU buckets, reduce_scatter on NCCL
    cpu = build_ds_config(
        DeepSpeedConfig(zero_stage=1), OptimConfig(), global_batch_size=64, world_size=8,
        total_steps=100, use_cuda=False,
    )  # fmt: skip
    assert "fused" not in cpu["optimizer"]["params"]
    assert cpu["zero_optimization"]["reduce_scatter"] is False  # gloo has none


def test_deepspeed_reads_the_config_as_fp32_communication():
    """DeepSpeed's own config parser (no engine) on the generated CUDA config."""
    from deepspeed.runtime.config import DeepSpeedConfig as DSParsed

    cfg = cuda_config(zero_stage=1, precision="bf16")
    cfg["train_batch_size"] = cfg["train_micro_batch_size_per_gpu"]  # the parser sees 1 rank
    parsed = DSParsed(cfg)
    assert parsed.communication_data_type == torch.float32
    assert parsed.grad_accum_dtype == "fp32"
    assert parsed.torch_autocast_enabled and parsed.torch_autocast_dtype == torch.bfloat16
    assert parsed.torch_autocast_lower_precision_safe_modules == []
    assert not parsed.bfloat16_config.enabled


def slurm_task_env(monkeypatch, env: dict[str, str]) -> None:
    """A SLURM task's variables, and no torch.distributed ones yet."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
    ):
        # set first, so that what the code under test exports is removed again afterwards
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)


def test_each_task_gets_an_existing_device():
    # 8 GPUs visible to each task (torchrun, plain srun): ordinal = local rank.
    assert [C.cuda_device_index(r, 8) for r in range(8)] == list(range(8))
    # SLURM narrowed each task to its own GPU (--gpus-per-task): ordinal 0 for every rank.
    assert {C.cuda_device_index(r, 1) for r in range(8)} == {0}
    with pytest.raises(RuntimeError, match="sees none"):
        C.cuda_device_index(0, 0)


@pytest.mark.parametrize("local_rank", [0, 3, 7])
def test_launcher_task_env_keeps_all_gpus_and_the_local_rank(monkeypatch, local_rank):
    """``launch.pretrain.export_distributed_env`` (submitit's SLURM variables) no longer narrows
    CUDA_VISIBLE_DEVICES while keeping LOCAL_RANK: every local rank maps to a visible GPU."""
    import launch.pretrain as pretrain

    env = {
        "SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "41", "SLURM_NTASKS": "16",
        "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[01-02]",
        "SLURM_PROCID": str(8 + local_rank), "SLURM_LOCALID": str(local_rank),
        "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7",
    }  # fmt: skip
    slurm_task_env(monkeypatch, env)
    monkeypatch.setattr(pretrain, "_reachable_address", lambda node: node)
    info = pretrain.export_distributed_env()
    assert info == {
        "rank": 8 + local_rank,
        "world_size": 16,
        "local_rank": local_rank,
        "job_id": "41",
    }
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7"
    assert os.environ["LOCAL_RANK"] == str(local_rank) and os.environ["MASTER_ADDR"] == "gpu01"
    visible = os.environ["CUDA_VISIBLE_DEVICES"].split(",")
    assert C.cuda_device_index(int(os.environ["LOCAL_RANK"]), len(visible)) == local_rank


def test_srun_without_rank_derives_it_from_slurm(monkeypatch):
    env = {
        "SLURM_JOB_ID": "77", "SLURM_STEP_NUM_TASKS": "4", "SLURM_NTASKS": "4",
        "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "n[3-4]", "SLURM_PROCID": "3",
        "SLURM_LOCALID": "1",
    }  # fmt: skip
    slurm_task_env(monkeypatch, env)
    C._export_slurm_env()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == (
        "3",
        "4",
        "1",
    )
    assert os.environ["MASTER_ADDR"] == "n3" and 20000 <= int(os.environ["MASTER_PORT"]) <= 32767
    # 4 tasks on 2 nodes: the hierarchical gather's node layout (loss.gather).
    assert os.environ["LOCAL_WORLD_SIZE"] == "2"
    # A batch step (one task) is not a distributed run.
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")
    C._export_slurm_env()
    assert "RANK" not in os.environ


def test_backend_strings():
    assert C.resolve_backend("auto") == (
        "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    )
    assert C.resolve_backend("gloo") == "gloo"
    with pytest.raises(ValueError, match="one of"):
        C.resolve_backend("mpi")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs CUDA"):
            C.resolve_backend("cpu:gloo,cuda:nccl")
    assert load_config(overrides=["deepspeed.backend=cpu:gloo,cuda:nccl"]).deepspeed.backend


def test_to_device_casts_media_only():
    video_u8 = torch.randint(0, 256, (2, 3, 4, 8, 8), dtype=torch.uint8)
    batch = {
        "video": video_u8, "audio": torch.randn(2, 1, 40, 50), "neg_audio": torch.randn(2, 1, 40, 50),
        "neg_kind": torch.tensor([0, 1]), "label": torch.tensor([3, 4]),
        "video_start": torch.tensor([300.7, 12.25], dtype=torch.float64), "key": ["a", "b"],
    }  # fmt: skip
    out = to_device(batch, torch.device("cpu"), torch.bfloat16)
    assert out["video"].dtype == out["audio"].dtype == out["neg_audio"].dtype == torch.bfloat16
    assert out["video_start"].dtype == torch.float64
    assert out["video_start"].tolist() == [300.7, 12.25]  # not rounded through a low precision
    assert out["neg_kind"].dtype == out["label"].dtype == torch.int64 and out["key"] == ["a", "b"]
    # uint8 video is normalised on the device exactly as the decoder normalises floats.
    from avts_dist.data.decode import KINETICS_MEAN, KINETICS_STD

    ref = (video_u8.float() / 255 - torch.tensor(KINETICS_MEAN).view(1, 3, 1, 1, 1)) / torch.tensor(
        KINETICS_STD
    ).view(1, 3, 1, 1, 1)
    assert torch.allclose(normalize_video(video_u8, torch.float32), ref)
    plain = to_device(batch, torch.device("cpu"))
    assert plain["video"].dtype == torch.float32 and plain["audio"] is batch["audio"]
    parts = micro_batches(plain, 2)
    assert [p["video"].shape[0] for p in parts] == [1, 1]
    assert torch.equal(parts[1]["neg_kind"], torch.tensor([1])) and set(parts[0]) == {
        "video", "audio", "neg_audio", "neg_kind",
    }  # fmt: skip


def test_determinism_settings(monkeypatch):
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        C.set_determinism(True, torch.device("cpu"))
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(previous)
    if torch.cuda.is_available():  # pragma: no cover - GPU machines
        monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
        C.set_determinism(True, torch.device("cuda"))
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert not torch.backends.cudnn.benchmark


def test_rendezvous_port_is_the_jobs_and_below_the_ephemeral_ports():
    # Every task of a job draws the same port; none lands in Linux's default ephemeral range
    # (32768-60999), where an outgoing connection on the master node could already hold it.
    ports = {job: C.rendezvous_port(job) for job in [str(i) for i in range(2000)] + ["61", "7_3"]}
    assert C.rendezvous_port("61") == C.rendezvous_port("61") == ports["61"]
    assert all(20000 <= p <= 32767 for p in ports.values())
    assert len(set(ports.values())) > 1500  # spread over the range, not one fixed port
