"""Weights in and out in torchvision's layout: `model.init_from` starts the video net from a
torchvision-layout state dict, and exported video weights load into a torchvision-layout module.

torchvision is used when it imports. It does not on the CPU test machines (PyPI's torchvision
does not install beside the pinned CPU torch wheel); there the torchvision-layout module is our
`VideoResNet` with torchvision's 400-way head, whose keys and shapes equal torchvision's (pinned
against a table written out from torchvision's resnet.py in tests/unit/test_models.py).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from avts_dist.config import ConfigError, ModelConfig, load_config
from avts_dist.export import (
    ExportError,
    build_initial_model,
    export_payload,
    load_pretrained,
    save_exported,
)
from avts_dist.models import AVTSModel, VideoResNet, build_model

try:
    import torchvision.models.video as tv_video
except Exception:  # ImportError, or torchvision's own failure beside a mismatched torch
    tv_video = None

ARCHS = ("r3d_18", "mc3_18", "r2plus1d_18")


def torchvision_layout_net(arch: str) -> torch.nn.Module:
    """torchvision's own module when it imports, else our layout-equal one (400-way head)."""
    if tv_video is not None:
        return getattr(tv_video, arch)(num_classes=400)
    return VideoResNet(arch=arch, num_classes=400)


def _cfg(arch: str, width: int = 64, **kw) -> ModelConfig:
    return ModelConfig(
        video_arch=arch, video_width=width, audio_arch="tiny", audio_width=4, embed_dim=8, **kw
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_init_from_a_torchvision_state_dict(arch, tmp_path):
    torch.manual_seed(1)
    source = torchvision_layout_net(arch)
    # Distinct buffers too, so running statistics are shown to arrive.
    for name, buf in source.named_buffers():
        if name.endswith("running_mean"):
            buf.normal_()
    path = tmp_path / f"{arch}_k400.pt"
    torch.save(source.state_dict(), path)

    model = build_initial_model(_cfg(arch, init_from=str(path)))
    want = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    got = model.video.state_dict()
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    # Without init_from the net starts elsewhere (the test above is not vacuous).
    fresh = build_initial_model(_cfg(arch)).video.state_dict()
    assert not torch.equal(fresh["stem.0.weight"], want["stem.0.weight"])


def test_init_from_accepts_wrapped_state_dicts_and_fsspec_urls(tmp_path):
    source = VideoResNet(arch="mc3_18", width=8, layers=(1, 1, 1, 1), num_classes=400)
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, tmp_path / "wrapped.pt")
    cfg = _cfg("mc3_18", width=8, video_layers=[1, 1, 1, 1])
    url = (tmp_path / "wrapped.pt").as_uri()  # file:// through fsspec
    model = build_initial_model(dataclasses.replace(cfg, init_from=url))
    assert torch.equal(model.video.stem[0].weight, source.stem[0].weight)
    # An avts export's video part serves as a starting point too.
    payload = export_payload(model, cfg)
    save_exported(payload, str(tmp_path / "export.pt"))
    again = build_initial_model(dataclasses.replace(cfg, init_from=str(tmp_path / "export.pt")))
    assert torch.equal(again.video.layer4[0].conv2[0].weight, source.layer4[0].conv2[0].weight)


def test_init_from_mismatches_name_the_first_keys(tmp_path):
    torch.save(VideoResNet(arch="r3d_18").state_dict(), tmp_path / "r3d.pt")
    with pytest.raises(ConfigError) as err:
        build_initial_model(_cfg("mc3_18", init_from=str(tmp_path / "r3d.pt")))
    msg = str(err.value)
    assert msg.startswith("config key 'model.init_from':") and "\n" not in msg
    # MC3's stages 2-4 are 1x3x3, R3D's 3x3x3: the first differing key is named with shapes.
    assert "layer2.0.conv1.0.weight: file [128, 64, 3, 3, 3] vs model [128, 64, 1, 3, 3]" in msg
    assert "mc3_18, width 64" in msg

    with pytest.raises(ConfigError, match=r"shape mismatch.*file \[64, 3, 3, 7, 7\] vs model"):
        build_initial_model(_cfg("r3d_18", width=8, init_from=str(tmp_path / "r3d.pt")))

    # A whole-model state dict (prefixed keys) is not a video state dict.
    torch.save(AVTSModel(_cfg("r3d_18", width=8)).state_dict(), tmp_path / "whole.pt")
    with pytest.raises(ConfigError) as err:
        build_initial_model(_cfg("r3d_18", width=8, init_from=str(tmp_path / "whole.pt")))
    assert "key(s) missing from the file: stem.0.weight" in str(err.value)
    assert "unexpected key(s) in the file: video.stem.0.weight" in str(err.value)

    with pytest.raises(ConfigError, match="model.init_from': file not found: .*nope.pt"):
        build_initial_model(_cfg("mc3_18", init_from=str(tmp_path / "nope.pt")))
    (tmp_path / "notes.txt").write_text("not weights")
    with pytest.raises(ConfigError, match="is not a torch state dict"):
        build_initial_model(_cfg("mc3_18", init_from=str(tmp_path / "notes.txt")))


def test_init_from_is_a_config_key():
    cfg = load_config("configs/pretrain/quickstart.yaml", ["model.init_from=s3://w/k400.pt"])
    assert cfg.model.init_from == "s3://w/k400.pt"
    assert load_config("configs/pretrain/quickstart.yaml").model.init_from == ""


@pytest.mark.parametrize("arch", ["mc3_18", "r2plus1d_18"])
def test_exported_video_weights_load_into_a_torchvision_layout_module(arch, tmp_path):
    torch.manual_seed(2)
    cfg = _cfg(arch)
    model = AVTSModel(cfg)
    with torch.no_grad():  # non-default BN statistics, as after training
        for name, buf in model.video.named_buffers():
            if name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
    path = str(tmp_path / "model.pt")
    save_exported(export_payload(model, cfg, step=7), path)

    exported = torch.load(path, weights_only=True)["video"]
    target = torchvision_layout_net(arch)
    missing, unexpected = target.load_state_dict(exported, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    target.fc = torch.nn.Identity()  # torchvision's forward then returns the pooled features

    ours = load_pretrained(path, part="video").eval()
    video_BCTHW = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        assert torch.allclose(target.eval()(video_BCTHW), ours(video_BCTHW), atol=1e-5)


def test_load_pretrained_parts(tmp_path):
    cfg = _cfg("mc3_18", width=8, video_layers=[1, 1, 1, 1], fusion_head=True)
    model = AVTSModel(cfg)
    path = str(tmp_path / "model.pt")
    save_exported(export_payload(model, cfg), path)
    audio = load_pretrained(path, part="audio")
    assert type(audio).__name__ == "AudioVGG"
    for key, value in model.audio.state_dict().items():
        assert torch.equal(audio.state_dict()[key], value), key
    whole = load_pretrained(path, part="model")
    assert isinstance(whole, AVTSModel) and "fusion" in whole.heads
    video = load_pretrained(path, part="video", activation_checkpointing=True)
    assert video.activation_checkpointing and video.fc is None
    with pytest.raises(ValueError, match=r"part must be one of \['video', 'audio', 'model'\]"):
        load_pretrained(path, part="heads")


def test_early_fusion_export_serves_its_video_and_model_but_no_audio_net(tmp_path):
    """An early-fusion export: video weights and the whole model load; an audio-only use is one
    clear error (its audio branch is not an audio network), not a state-dict mismatch."""
    from eval.common import EvalError
    from eval.pretrained import resolve_pretrained as load_for_eval

    cfg = dataclasses.replace(
        _cfg("mc3_18", width=8, video_layers=[1, 1, 1, 1]), arch="early_fusion"
    )
    model = build_model(cfg)
    path = str(tmp_path / "ef.pt")
    save_exported(export_payload(model, cfg), path)
    pre = load_for_eval(path)
    assert type(pre.model()).__name__ == "EarlyFusionModel"
    for key, value in model.video.state_dict().items():
        assert torch.equal(pre.video_net().state_dict()[key], value), key
    with pytest.raises(EvalError, match="early_fusion: its audio branch"):
        pre.audio_net()
    # The library's loader says the same (one loader under both).
    with pytest.raises(ExportError, match="early_fusion: its audio branch"):
        load_pretrained(path, part="audio")


def test_build_model_reads_no_weights():
    """Models are architecture only: ``model.init_from`` is read by build_initial_model, never by
    the registry's build_model (which does no I/O)."""
    cfg = _cfg("mc3_18", width=8, video_layers=[1, 1, 1, 1], init_from="/nonexistent/k400.pt")
    assert isinstance(build_model(cfg), AVTSModel)
    with pytest.raises(ConfigError, match="file not found: /nonexistent/k400.pt"):
        build_initial_model(cfg)
