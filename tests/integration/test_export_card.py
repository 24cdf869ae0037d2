"""Weights for everyone, on the shared tiny training run: `avts export` writes MODEL_CARD.md
beside model.pt, the card's figures are the run's, its loading snippet runs as written, and
`load_pretrained` reads the weights from S3 (moto server) as from disk."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from avts_dist.cli import main
from avts_dist.config import load_config
from avts_dist.data import build_loader
from avts_dist.export import load_pretrained
from avts_dist.train.batch import normalize_video
from tests.fixtures.tiny_run import TINY_RUN_STEPS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("export") / "weights" / "model.pt"
    assert main(["export", "--checkpoint", str(tiny_run["checkpoints"]), "--out", str(out)]) == 0
    return {"path": out, "card": (out.parent / "MODEL_CARD.md").read_text()}


def _shape(card: str, name: str) -> list[int]:
    """The shape the card states for ``name``, with B = 1."""
    m = re.search(rf"`{name}` = \[B, ([\d, ]+)\]", card)
    assert m, f"{name} shape not in the card"
    return [1, *(int(x) for x in m.group(1).split(", "))]


def _real_batch(tiny_run) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of held-out clips as the training pipeline makes them (decode, log-mel)."""
    loader = build_loader(load_config(tiny_run["config"]).data, train=False)
    try:
        batch = next(iter(loader))
    finally:
        loader.close()
    # The loader sends uint8 video; the trainer normalises it on its device, as here.
    return normalize_video(batch["video"], torch.float32), batch["audio"]


def test_model_card_describes_the_run(tiny_run, exported):
    card = exported["card"]
    cfg = load_config(tiny_run["config"])
    lines = [json.loads(ln) for ln in (tiny_run["run_dir"] / "metrics.jsonl").open()]
    assert card.startswith("# AVTS pretrained weights: mc3_18 video net + tiny audio net")
    assert f"- steps: {TINY_RUN_STEPS}; clips seen: {2 * TINY_RUN_STEPS}" in card
    assert f"`{tiny_run['corpus']}` split `train`, global batch 2" in card
    assert "easy (easy 1) until step 4 -> easy_hard (easy 0.5, hard 0.5)" in card
    assert f"step_{TINY_RUN_STEPS:06d}" in card
    # Validation figures of the exported step, as the trainer logged them.
    val = lines[TINY_RUN_STEPS - 1]
    for key in ("val/sync_acc_easy", "val/sync_acc_hard"):
        assert f"| {key} | {val[key]:.4f} |" in card
    # The input spec's numbers are the config's, and the normalisation is stated.
    assert f"{cfg.data.num_frames} frames at {cfg.data.fps:g} fps" in card
    assert "mean [0.43216, 0.394666, 0.37645]" in card
    assert f"mono at {cfg.data.sample_rate} Hz" in card and "hop 160 (10 ms)" in card
    assert "secret" not in card.lower() and "storage_options" not in card


def test_model_card_shapes_and_snippet_match_the_real_pipeline(tiny_run, exported):
    card = exported["card"]
    video, spec = _real_batch(tiny_run)
    assert list(video.shape[1:]) == _shape(card, "video_BCTHW")[1:]
    assert list(spec.shape[1:]) == _shape(card, "logmel_B1FT")[1:]
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert len(snippet.strip().splitlines()) == 3
    scope = {"video_BCTHW": video}
    exec(snippet.replace('"model.pt"', repr(str(exported["path"]))), scope)
    features = scope["features"]
    stated = int(re.search(r"features = .*# \[B, (\d+)\]", snippet).group(1))
    assert features.shape == (video.shape[0], stated) and torch.isfinite(features).all()
    audio_net = load_pretrained(str(exported["path"]), part="audio").eval()
    with torch.no_grad():
        assert audio_net(spec).shape[1] == int(
            re.search(r"\| audio \|.*\| \[B, (\d+)\] \|", card).group(1)
        )


def test_export_and_load_pretrained_through_s3(tiny_run, exported, s3_server, s3_bucket):
    url = f"s3://{s3_bucket}/weights/model.pt"
    opts = json.dumps({"client_kwargs": {"endpoint_url": s3_server}})
    args = ["export", "--checkpoint", str(tiny_run["checkpoints"]), "--out", url]
    assert main([*args, "--storage-options", opts]) == 0
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}, skip_instance_cache=True)
    assert fs.cat_file(f"{s3_bucket}/weights/MODEL_CARD.md").decode() == exported["card"]
    remote = load_pretrained(url, part="video", storage_options=json.loads(opts)).eval()
    local = load_pretrained(str(exported["path"]), part="video").eval()
    for key, value in local.state_dict().items():
        assert torch.equal(remote.state_dict()[key], value), key
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 3, 8, 32, 32))).float()
    with torch.no_grad():
        assert torch.equal(remote(x), local(x))
