"""The trainer's parts outside trainer.py: the per-objective forward (train/objectives.py), the
stop policy (train/stopping.py) and the progress line's fields (tracking/session.py). The loop
that uses them is exercised end to end by tests/integration/test_train.py."""

from __future__ import annotations

import signal
from types import SimpleNamespace

import torch

from avts_dist.config import load_config
from avts_dist.losses import build_loss
from avts_dist.models import build_model
from avts_dist.tracking import MetricsLogger, NoTracking, progress_fields
from avts_dist.train.objectives import forward_loss
from avts_dist.train.stopping import stop_reason
from tests.unit.test_models import TINY_OVERRIDES as TINY


def _spy(loss_fn, seen):
    def call(*args, **kwargs):
        seen.append(([a.dtype if torch.is_tensor(a) else a for a in args], kwargs))
        return loss_fn(*args, **kwargs)

    return call


def test_avts_forward_casts_embeddings_to_fp32_before_the_loss():
    cfg = load_config(None, TINY)
    torch.manual_seed(0)
    model = build_model(cfg.model).to(torch.bfloat16)
    batch = {
        "video": torch.randn(4, 3, 8, 32, 32, dtype=torch.bfloat16),
        "audio": torch.randn(4, 1, 40, 80, dtype=torch.bfloat16),
        "neg_audio": torch.randn(4, 1, 40, 80, dtype=torch.bfloat16),
        "neg_kind": torch.tensor([0, 1, 0, 1]),
    }
    seen: list = []
    terms = forward_loss(
        model, _spy(build_loss(cfg.loss), seen), batch, objective="avts", rank=0, world_size=1
    )
    dtypes, kwargs = seen[0]
    # The gather (and its backward reduce-scatter) sees fp32, not the model's bf16.
    assert dtypes[:3] == [torch.float32] * 3
    assert kwargs["sync_logit"] is None and kwargs["rank"] == 0
    assert terms["loss"].dtype == torch.float32 and torch.isfinite(terms["loss"])


def test_video_ssl_forward_feeds_both_views_and_ignores_avts_kwargs():
    cfg = load_config(None, [*TINY, "train.objective=video_ssl"])
    torch.manual_seed(0)
    model = build_model(cfg.model, "video_ssl")
    video = torch.randn(4, 3, 8, 32, 32)
    seen: list = []
    terms = forward_loss(
        model, _spy(build_loss(cfg.loss, "video_ssl"), seen),
        {"video": video, "video2": video.flip(-1)}, objective="video_ssl", rank=0,
        world_size=1, weights={"easy": 1.0}, step=3,
    )  # fmt: skip
    dtypes, kwargs = seen[0]
    assert len(dtypes) == 2 and set(kwargs) == {"rank", "world_size"}
    assert torch.isfinite(terms["loss"])


def test_stop_reason():
    assert stop_reason(0, 3, None) is None
    assert stop_reason(2, 3, None) is None
    assert stop_reason(3, 3, None) == "nonfinite"
    assert stop_reason(0, 3, signal.SIGTERM) == "preempted"
    # Non-finite wins: a preempted run must not publish a state inside a non-finite run.
    assert stop_reason(3, 3, signal.SIGUSR2) == "nonfinite"


def test_progress_fields(tmp_path):
    metrics = MetricsLogger(
        tmp_path / "m.jsonl", device=torch.device("cpu"), world_size=1, is_main=True
    )
    metrics.last_loss = 0.25
    metrics.latest = {"data/wait_fraction": 0.1, "data/retries": 2}
    fields = progress_fields(metrics, NoTracking())
    assert fields == {"loss": 0.25, "data_wait": 0.1, "retries": 2, "tracking": None}
    down = SimpleNamespace(
        writer=SimpleNamespace(is_down=True, outbox=SimpleNamespace(num_pending=7))
    )
    assert progress_fields(metrics, down)["tracking"] == "MLflow down, 7 records buffered"
