"""A real DeepSpeed engine (one CPU process, gloo) built from the config generated for CUDA,
with bf16: torch's fused AdamW (no JIT-built op), bf16 compute, and fp32 weights, BatchNorm
statistics and gradient communication. The pieces that need no engine are in
``tests/unit/test_gpu_path.py``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

_ENGINE_STEP = """
import json, torch
from avts_dist.config import load_config
from avts_dist.distributed import collectives as C
from avts_dist.distributed.engine import build_ds_config, initialize_engine, optimizer_step
from avts_dist.models import build_model
from deepspeed.runtime.torch_autocast import get_all_comm_dtypes
cfg = load_config(overrides=[
    "model.video_arch=mc3_18", "model.video_width=4", "model.video_layers=[1,1,1,1]",
    "model.audio_arch=tiny", "model.audio_width=4", "model.embed_dim=8",
    "deepspeed.zero_stage=1", "deepspeed.precision=bf16"])
C.init_distributed("gloo")
ds = build_ds_config(cfg.deepspeed, cfg.optim, global_batch_size=2, world_size=1, total_steps=4,
                     use_cuda=True)
engine = initialize_engine(build_model(cfg.model), ds, backend="gloo")
out = engine(torch.randn(2, 3, 4, 16, 16), torch.randn(2, 1, 40, 50), None)
loss = (out["video_emb"].float() - out["audio_emb"].float()).pow(2).mean()
engine.backward(loss)
applied = optimizer_step(engine, skip=False)
params = list(engine.module.parameters())
print(json.dumps({
    "optimizer": type(engine.optimizer.optimizer).__module__ + "." + type(engine.optimizer.optimizer).__name__,
    "fused": engine.optimizer.optimizer.defaults.get("fused"),
    "emb_dtype": str(out["video_emb"].dtype),
    "param_dtypes": sorted({str(p.dtype) for p in params}),
    "buffer_dtypes": sorted({str(b.dtype) for b in engine.module.buffers() if b.is_floating_point()}),
    "comm_dtypes": sorted(str(d) for d in get_all_comm_dtypes(params)),
    "engine_comm": str(engine.communication_data_type),
    "applied": applied, "finite": bool(torch.isfinite(loss).item()),
}))
"""


def test_bf16_autocast_step_with_the_cuda_config_on_cpu():
    """A real DeepSpeed engine (CPU, gloo) built from the CUDA config: torch's fused AdamW,
    bf16 compute, fp32 weights, BatchNorm statistics and gradient communication."""
    proc = subprocess.run(
        [sys.executable, "-c", _ENGINE_STEP], capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["optimizer"] == "torch.optim.adamw.AdamW" and got["fused"] is True
    assert got["emb_dtype"] == "torch.bfloat16"  # computed under autocast
    assert got["param_dtypes"] == ["torch.float32"] == got["buffer_dtypes"]
    assert got["comm_dtypes"] == ["torch.float32"] and got["engine_comm"] == "torch.float32"
    assert got["applied"] and got["finite"]
