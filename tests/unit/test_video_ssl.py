"""train.objective=video_ssl (CVRL), single process: config keys, the two-view InfoNCE against
its definition, the model's video-net layout, the video-only export, two-view planning."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from avts_dist.config import ConfigError, LossConfig, load_config
from avts_dist.data.pairs import plan_views
from avts_dist.data.sampler import sample_rng
from avts_dist.export import ExportError, export_payload, load_pretrained, model_card, save_exported
from avts_dist.losses import VideoSSLInfoNCELoss, build_loss, reduce_metrics
from avts_dist.models import AVTSModel, VideoSSLModel, build_model
from avts_dist.train.batch import micro_batches

TINY = [
    "model.video_arch=mc3_18",
    "model.video_width=8",
    "model.video_layers=[1,1,1,1]",
    "model.audio_arch=tiny",
    "model.audio_width=8",
    "model.embed_dim=16",
]


def test_objective_keys_are_validated():
    assert load_config(None, []).train.objective == "avts"
    assert load_config(None, ["train.objective=video_ssl"]).loss.video_ssl_temperature == 0.1
    with pytest.raises(ConfigError, match="train.objective"):
        load_config(None, ["train.objective=audio_ssl"])
    with pytest.raises(ConfigError, match="train.objective.*two_stream"):
        load_config(None, ["train.objective=video_ssl", "model.arch=early_fusion"])
    with pytest.raises(ConfigError, match="loss.video_ssl_temperature"):
        load_config(None, ["loss.video_ssl_temperature=0"])


def _reference_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> tuple[float, float]:
    """NT-Xent written from its definition, one anchor at a time: (mean loss, top-1 accuracy)."""
    z = torch.nn.functional.normalize(torch.cat([z1, z2]).double(), dim=1)
    n = z1.shape[0]
    losses, hits = [], []
    for i in range(2 * n):
        positive = i + n if i < n else i - n
        others = [k for k in range(2 * n) if k != i]
        sims = {k: float(z[i] @ z[k]) / temperature for k in others}
        log_denominator = math.log(sum(math.exp(s) for s in sims.values()))
        losses.append(log_denominator - sims[positive])
        hits.append(max(sims, key=sims.get) == positive)
    return sum(losses) / len(losses), sum(hits) / len(hits)


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_loss_equals_its_definition(temperature):
    gen = torch.Generator().manual_seed(0)
    z1 = torch.randn(6, 5, generator=gen)
    z2 = z1 + 0.8 * torch.randn(6, 5, generator=gen)
    loss_fn = build_loss(LossConfig(video_ssl_temperature=temperature), objective="video_ssl")
    assert isinstance(loss_fn, VideoSSLInfoNCELoss)
    out = loss_fn(z1, z2)
    ref_loss, ref_acc = _reference_loss(z1, z2, temperature)
    assert out["loss"].item() == pytest.approx(ref_loss, rel=1e-5)
    reduced = reduce_metrics(out, world_size=1)
    assert reduced["acc/view"] == pytest.approx(ref_acc)
    assert reduced["loss/view_infonce"] == pytest.approx(ref_loss, rel=1e-5)
    assert 0.0 < ref_acc < 1.0  # the noise level makes some views rank first and some not


def test_loss_rewards_matching_views_and_reaches_both():
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(8, 16, generator=gen)
    loss_fn = VideoSSLInfoNCELoss(LossConfig())
    same = loss_fn(z, z.clone())
    other = loss_fn(z, torch.randn(8, 16, generator=gen))
    assert same["loss"] < other["loss"]
    assert same["acc/view"].item() == 1.0
    v1, v2 = z.clone().requires_grad_(), torch.randn(8, 16, generator=gen).requires_grad_()
    loss_fn(v1, v2)["loss"].backward()
    assert v1.grad.abs().sum() > 0 and v2.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="view1_emb and view2_emb"):
        loss_fn(z, z[:4])


def test_model_keeps_the_video_net_layout():
    cfg = load_config(None, TINY).model
    torch.manual_seed(0)
    model = build_model(cfg, objective="video_ssl")
    assert isinstance(model, VideoSSLModel) and not hasattr(model, "audio")
    avts_video = {k: v.shape for k, v in AVTSModel(cfg).video.state_dict().items()}
    assert {k: v.shape for k, v in model.video.state_dict().items()} == avts_video
    out = model(torch.randn(3, 3, 8, 16, 16), torch.randn(3, 3, 8, 16, 16))
    assert out["view1_emb"].shape == out["view2_emb"].shape == (3, 16)
    # The two views go through one pass: each row is its own clip's projection in eval mode.
    model.eval()
    clip = torch.randn(1, 3, 8, 16, 16)
    pair = model(clip, torch.randn(1, 3, 8, 16, 16))["view1_emb"]
    torch.testing.assert_close(pair, model.encode_video(clip))


def test_export_is_video_only_and_says_so(tmp_path):
    cfg = load_config(None, TINY).model
    torch.manual_seed(0)
    model = VideoSSLModel(cfg).eval()
    payload = export_payload(model, cfg, source_checkpoint="ckpt", step=3)
    assert payload["objective"] == "video_ssl" and "audio" not in payload
    path = save_exported(payload, str(tmp_path / "model.pt"))
    video_net = load_pretrained(path, part="video").eval()
    clip = torch.randn(2, 3, 8, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(video_net(clip), model.video(clip))
    for part in ("audio", "model"):
        with pytest.raises(ExportError, match="train.objective=video_ssl and has no audio net"):
            load_pretrained(path, part=part)
    card = model_card(payload)
    assert "no audio net" in card and 'part="video"' in card
    # An AVTS export still has both nets.
    avts = export_payload(AVTSModel(cfg), cfg)
    assert avts["objective"] == "avts" and "audio" in avts


def test_plan_views_is_a_pure_function_of_the_sample():
    durations = np.array([4.0, 1.5, 1.0])
    plans = [plan_views(sample_rng(7, 0, p), 0, durations, 1.0) for p in range(50)]
    again = plan_views(sample_rng(7, 0, 3), 0, durations, 1.0)
    assert again == plans[3]
    starts = np.array([(p.video_start, p.video2_start) for p in plans])
    assert starts.min() >= 0.0 and starts.max() <= 3.0
    # Independent windows: they differ, and their offset takes both signs.
    offsets = starts[:, 1] - starts[:, 0]
    assert (offsets > 0.1).any() and (offsets < -0.1).any()
    assert all(p.aug_seed != p.aug2_seed for p in plans)
    # A clip exactly one window long has one window, twice.
    short = plan_views(sample_rng(7, 0, 0), 2, durations, 1.0)
    assert short.video_start == short.video2_start == 0.0


def test_micro_batches_of_a_two_view_batch():
    batch = {
        "video": torch.zeros(4, 3, 2, 4, 4),
        "video2": torch.ones(4, 3, 2, 4, 4),
        "key": ["a", "b", "c", "d"],
    }
    parts = micro_batches(batch, 2)
    assert [sorted(p) for p in parts] == [["video", "video2"]] * 2
    assert parts[1]["video2"].shape[0] == 2
