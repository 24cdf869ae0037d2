"""Video/audio subnetworks, the two-stream AVTS model, heads and exported weights.

torchvision is not installable here, so torchvision compatibility is checked against a table of
state_dict keys and shapes written out below from torchvision's architecture definition
(``torchvision/models/video/resnet.py``): a state dict with exactly those keys must load with
``strict=True``. Full-size nets are only built (on the meta device where no data is needed);
forward passes run on tiny variants.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

from avts_dist.config import ConfigError, ModelConfig, load_config
from avts_dist.export import (
    ExportError,
    export_payload,
    load_exported,
    load_pretrained,
    save_exported,
)
from avts_dist.models import (
    AudioClassifier,
    AudioVGG,
    AVTSModel,
    EarlyFusionModel,
    FusedClassifier,
    VideoClassifier,
    batch_partner,
    build_model,
    build_video_net,
    load_torchvision_weights,
    mc3_18,
    model_name,
    model_names,
    r2plus1d_18,
    r3d_18,
    register_model,
    silent_logmel,
)
from avts_dist.models.registry import _BUILDERS

ARCHS = {"r3d_18": r3d_18, "mc3_18": mc3_18, "r2plus1d_18": r2plus1d_18}
# torchvision's published num_params for the Kinetics-400 weights (R3D_18_Weights etc.).
PUBLISHED_PARAMS = {"r3d_18": 33_371_472, "mc3_18": 11_695_440, "r2plus1d_18": 31_505_325}
TINY = dict(width=8, layers=[1, 1, 1, 1])
TINY_OVERRIDES = [
    "model.video_width=8",
    "model.video_layers=[1,1,1,1]",
    "model.audio_arch=tiny",
    "model.audio_width=8",
    "model.embed_dim=32",
]


# -- torchvision's layout, written out ------------------------------------------------------------


def torchvision_video_shapes(arch: str, num_classes: int = 400) -> dict[str, tuple[int, ...]]:
    """Key -> shape of torchvision's ``arch`` state_dict, from its resnet.py rules:

    - BasicStem: stem.0 Conv3d(3, 64, 3x7x7), stem.1 BN(64). R2Plus1dStem: stem.0 Conv3d(3, 45,
      1x7x7), stem.1 BN(45), stem.3 Conv3d(45, 64, 3x1x1), stem.4 BN(64).
    - layerN (planes 64, 128, 256, 512; two BasicBlocks each): block.conv1 = Sequential(conv,
      BN, ReLU), block.conv2 = Sequential(conv, BN). conv = Conv3DSimple (3x3x3), Conv3DNoTemporal
      (1x3x3) or Conv2Plus1D = Sequential(Conv 1x3x3 -> mid, BN(mid), ReLU, Conv 3x1x1 -> out),
      mid = (inplanes*planes*27) // (inplanes*9 + 3*planes), computed once per block from the
      block's inplanes and used by both of its convs.
    - downsample = Sequential(Conv3d 1x1x1, BN) on the first block of layers 2-4.
    - fc = Linear(512, num_classes).
    """
    shapes: dict[str, tuple[int, ...]] = {}

    def bn(prefix: str, c: int) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{name}"] = (c,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    def conv(prefix: str, kind: str, cin: int, cout: int, mid: int) -> None:
        if kind == "2+1d":
            shapes[f"{prefix}.0.weight"] = (mid, cin, 1, 3, 3)
            bn(f"{prefix}.1", mid)
            shapes[f"{prefix}.3.weight"] = (cout, mid, 3, 1, 1)
        elif kind == "3d":
            shapes[f"{prefix}.weight"] = (cout, cin, 3, 3, 3)
        else:
            shapes[f"{prefix}.weight"] = (cout, cin, 1, 3, 3)

    if arch == "r2plus1d_18":
        shapes["stem.0.weight"] = (45, 3, 1, 7, 7)
        bn("stem.1", 45)
        shapes["stem.3.weight"] = (64, 45, 3, 1, 1)
        bn("stem.4", 64)
        kinds = ["2+1d"] * 4
    else:
        shapes["stem.0.weight"] = (64, 3, 3, 7, 7)
        bn("stem.1", 64)
        kinds = ["3d"] * 4 if arch == "r3d_18" else ["3d", "2d", "2d", "2d"]
    inplanes = 64
    for stage, planes in enumerate([64, 128, 256, 512]):
        for block in range(2):
            p = f"layer{stage + 1}.{block}"
            cin = inplanes if block == 0 else planes
            mid = (cin * planes * 27) // (cin * 9 + 3 * planes)
            conv(f"{p}.conv1.0", kinds[stage], cin, planes, mid)
            bn(f"{p}.conv1.1", planes)
            conv(f"{p}.conv2.0", kinds[stage], planes, planes, mid)
            bn(f"{p}.conv2.1", planes)
            if block == 0 and stage > 0:
                shapes[f"{p}.downsample.0.weight"] = (planes, cin, 1, 1, 1)
                bn(f"{p}.downsample.1", planes)
        inplanes = planes
    shapes["fc.weight"] = (num_classes, 512)
    shapes["fc.bias"] = (num_classes,)
    return shapes


def fake_torchvision_state_dict(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in torchvision_video_shapes(arch).items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(7, dtype=torch.long)
        else:
            out[key] = torch.randn(shape, generator=gen)
    return out


@pytest.mark.parametrize("arch", list(ARCHS))
def test_state_dict_keys_and_shapes_equal_torchvision(arch):
    with torch.device("meta"):
        net = ARCHS[arch]()
    ours = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    expected = torchvision_video_shapes(arch)
    assert list(ours) == list(expected)  # same names, same order
    assert ours == expected
    assert sum(p.numel() for p in net.parameters()) == PUBLISHED_PARAMS[arch]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_torchvision_weights_load_strict(arch):
    net = ARCHS[arch]()
    sd = fake_torchvision_state_dict(arch)
    net.load_state_dict(sd, strict=True)
    assert torch.equal(net.layer3[0].conv1[1].running_var, sd["layer3.0.conv1.1.running_var"])
    assert torch.equal(net.fc.weight, sd["fc.weight"])
    # A headless backbone takes the same file, minus the Kinetics classifier.
    backbone = ARCHS[arch](num_classes=0)
    load_torchvision_weights(backbone, sd)
    assert "fc.weight" not in backbone.state_dict()
    assert torch.equal(backbone.stem[0].weight, sd["stem.0.weight"])
    # A net of another shape must not load silently.
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_torchvision_weights(ARCHS[arch](width=32, num_classes=0), sd)


@pytest.mark.parametrize(
    "arch, layer4_thw", [("r3d_18", (2, 7, 7)), ("mc3_18", (16, 7, 7)), ("r2plus1d_18", (2, 7, 7))]
)
def test_full_size_strides_at_16x112x112(arch, layer4_thw):
    # Shapes only (meta device): MC3 keeps time in stages 2-4, the others stride it by 8.
    with torch.device("meta"):
        net = ARCHS[arch]()
        video = torch.empty(1, 3, 16, 112, 112)
        assert net.features(video, layer="layer4", pooled=False).shape == (1, 512, *layer4_thw)
        assert net(video).shape == (1, 400)
    if arch == "mc3_18":
        assert net.layer2[0].downsample[0].stride == (1, 2, 2)
        assert net.layer2[0].conv1[0].stride == (1, 2, 2)
    else:
        assert net.layer2[0].downsample[0].stride == (2, 2, 2)


# -- tiny variants: features, options -------------------------------------------------------------


@pytest.mark.parametrize("arch", list(ARCHS))
def test_tiny_video_features_every_stage(arch):
    torch.manual_seed(0)
    net = ARCHS[arch](num_classes=0, **TINY).eval()
    video = torch.randn(2, 3, 8, 32, 32)
    assert net.feature_dim == 64
    for layer in net.stage_names:
        pooled = net.features(video, layer=layer)
        assert pooled.shape == (2, net.feature_dim_of(layer)), layer
        if layer != "pool":
            full = net.features(video, layer=layer, pooled=False)
            assert full.dim() == 5 and full.shape[1] == net.feature_dim_of(layer)
            torch.testing.assert_close(full.mean(dim=(2, 3, 4)), pooled)
    torch.testing.assert_close(net(video), net.features(video, layer="pool"))
    with pytest.raises(ValueError, match="unknown layer 'layer5'"):
        net.features(video, layer="layer5")


def test_width_and_depth_options():
    net = r2plus1d_18(width=16, layers=[1, 2, 1, 3], num_classes=0)
    assert [len(getattr(net, f"layer{i}")) for i in range(1, 5)] == [1, 2, 1, 3]
    assert net.feature_dim == 128
    assert net.stem[0].out_channels == (45 * 16) // 64
    with pytest.raises(ValueError, match="four stage depths"):
        r3d_18(layers=[1, 1, 1])


@pytest.mark.parametrize("arch", ["r2plus1d_18", "mc3_18"])
def test_activation_checkpointing_same_outputs_and_grads(arch):
    torch.manual_seed(0)
    plain = ARCHS[arch](num_classes=5, **TINY)
    ckpt = ARCHS[arch](num_classes=5, activation_checkpointing=True, **TINY)
    ckpt.load_state_dict(plain.state_dict())
    video = torch.randn(2, 3, 8, 32, 32)
    outs = []
    for net in (plain, ckpt):
        net.train()
        out = net(video)
        out.square().sum().backward()
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1])
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    # Recomputation must not update BatchNorm running statistics a second time.
    for (name, a), b in zip(plain.state_dict().items(), ckpt.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_audio_activation_checkpointing_keeps_bn_stats():
    torch.manual_seed(0)
    plain, ckpt = AudioVGG("tiny", 8), AudioVGG("tiny", 8, activation_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    logmel = torch.randn(2, 1, 40, 50)
    for net in (plain, ckpt):
        net.train()(logmel).square().sum().backward()
    torch.testing.assert_close(plain.layer2[0].weight.grad, ckpt.layer2[0].weight.grad)
    for (name, a), b in zip(plain.state_dict().items(), ckpt.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_channels_last_3d_same_outputs():
    torch.manual_seed(0)
    plain = r3d_18(num_classes=0, **TINY).eval()
    cl = r3d_18(num_classes=0, channels_last_3d=True, **TINY).eval()
    cl.load_state_dict(plain.state_dict())
    assert cl.layer1[0].conv1[0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    video = torch.randn(2, 3, 8, 32, 32)
    torch.testing.assert_close(cl.features(video), plain.features(video), rtol=1e-4, atol=1e-5)


def test_models_package_has_no_distributed_code():
    # Parsed, not grepped: docstrings may mention torch.distributed, code may not use it.
    src = Path(__file__).resolve().parents[2] / "avts_dist" / "models"
    for path in src.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Attribute):
                names = [ast.unparse(node)]
            else:
                continue
            bad = [n for n in names if n.startswith(("torch.distributed", "deepspeed"))]
            assert not bad, f"{path.name}: {bad}"


def _module_imports(path: Path) -> list[str]:
    """Every module name ``path`` imports, at any depth (function-local imports too)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append(node.module or "")
    return names


def test_models_package_does_no_io_and_has_no_import_cycle():
    """Architecture only: weights are read and written by avts_dist.export, and the modules
    import each other one way (the registry on top), never back."""
    src = Path(__file__).resolve().parents[2] / "avts_dist" / "models"
    graph = {}
    for path in src.glob("*.py"):
        names = _module_imports(path)
        io = [n for n in names if n.startswith(("fsspec", "s3fs", "avts_dist.storage"))]
        io += [n for n in names if n.startswith(("avts_dist.export", "avts_dist.train"))]
        assert not io, f"{path.name}: {io}"
        mod = path.stem
        graph[mod] = {n.split(".")[2] for n in names if n.startswith("avts_dist.models.")}
    graph.pop("__init__")
    done: set[str] = set()

    def visit(mod: str, stack: tuple[str, ...]) -> None:
        assert mod not in stack, f"import cycle: {' -> '.join((*stack, mod))}"
        if mod in done:
            return
        for dep in graph.get(mod, ()):
            visit(dep, (*stack, mod))
        done.add(mod)

    for mod in graph:
        visit(mod, ())
    assert graph["registry"] >= {"avts", "early_fusion", "video_ssl"}


def test_build_model_is_a_registry():
    assert model_names() == ["early_fusion", "two_stream", "video_ssl"]
    cfg = tiny_model_config()
    assert model_name(cfg) == "two_stream" and model_name(cfg, "video_ssl") == "video_ssl"
    assert model_name(tiny_model_config(arch="early_fusion"), "video_ssl") == "early_fusion"
    assert type(build_model(cfg, "video_ssl")).__name__ == "VideoSSLModel"
    with pytest.raises(ValueError, match="'two_stream' is already registered"):
        register_model("two_stream", AVTSModel)
    # model.arch's config check names the built-in archs; the registry is checked at build.
    unknown = tiny_model_config()
    unknown.arch = "late_fusion"
    with pytest.raises(ValueError, match=r"unknown model 'late_fusion'; registered: \['early"):
        build_model(unknown)
    register_model("video_only_classifier", lambda c: VideoClassifier(build_video_net(c), 3))
    try:
        assert "video_only_classifier" in model_names()
        unknown.arch = "video_only_classifier"
        model = build_model(unknown)
        assert model(torch.randn(2, 3, 8, 32, 32)).shape == (2, 3)
    finally:
        _BUILDERS.pop("video_only_classifier")


# -- audio -------------------------------------------------------------------------------------


def test_audio_vgg_full_and_tiny():
    full = AudioVGG("vgg", width=64)
    assert full.feature_dim == 512
    # Two conv3x3 per stage at 64-128-256-512 channels, plus BN affine parameters.
    convs = [
        (1, 64),
        (64, 64),
        (64, 128),
        (128, 128),
        (128, 256),
        (256, 256),
        (256, 512),
        (512, 512),
    ]
    expected = sum(9 * a * b + 2 * b for a, b in convs)
    assert sum(p.numel() for p in full.parameters()) == expected
    tiny = AudioVGG("tiny", width=8).eval()
    logmel = torch.randn(3, 1, 40, 100)
    assert tiny(logmel).shape == (3, 64)
    assert tiny.features(logmel, layer="layer2", pooled=False).shape == (3, 16, 10, 25)
    assert tiny.features(logmel, layer="layer3").shape == (3, 32)
    # Short clips (a few frames) still pool to a feature vector.
    assert tiny(torch.randn(2, 1, 16, 3)).shape == (2, 64)
    with pytest.raises(ValueError, match=r"log-mel \[B, 1, F, T\]"):
        tiny(torch.randn(2, 40, 100))
    with pytest.raises(ValueError, match="unknown audio arch"):
        AudioVGG("resnet")


# -- two-stream model ----------------------------------------------------------------------------


def tiny_model_config(**changes) -> ModelConfig:
    cfg = load_config(None, TINY_OVERRIDES).model
    return dataclasses.replace(cfg, **changes)


def test_build_model_forward_contract():
    torch.manual_seed(0)
    model = build_model(tiny_model_config())
    assert isinstance(model, AVTSModel)
    video = torch.randn(4, 3, 8, 32, 32)
    logmel, neg = torch.randn(4, 1, 40, 80), torch.randn(4, 1, 40, 80)
    out = model(video, logmel, neg)
    assert set(out) == {"video_emb", "audio_emb", "neg_audio_emb"}
    for key in out:
        assert out[key].shape == (4, 32), key
    # Negatives go through the same audio net in the same pass.
    model.eval()
    out = model(video, logmel, neg)
    torch.testing.assert_close(out["neg_audio_emb"], model.encode_audio(neg))
    no_neg = model(video, logmel)
    assert no_neg["neg_audio_emb"] is None
    torch.testing.assert_close(no_neg["audio_emb"], out["audio_emb"])
    with pytest.raises(ValueError, match="negative audio shape"):
        model(video, logmel, neg[:2])


def test_fusion_head_and_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = build_model(tiny_model_config(fusion_head=True)).train()
    video = torch.randn(2, 3, 8, 32, 32)
    out = model(video, torch.randn(2, 1, 40, 80), torch.randn(2, 1, 40, 80))
    assert out["sync_logit"].shape == (2,) and out["neg_sync_logit"].shape == (2,)
    loss = sum(out[k].square().mean() for k in out)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not missing
    assert set(model.heads) == {"video", "audio", "fusion"}


# -- early fusion --------------------------------------------------------------------------------


def test_early_fusion_forward_contract():
    torch.manual_seed(0)
    model = build_model(tiny_model_config(arch="early_fusion", temporal_bins=4)).eval()
    assert isinstance(model, EarlyFusionModel)
    video = torch.randn(4, 3, 8, 32, 32)
    logmel, neg = torch.randn(4, 1, 40, 80), torch.randn(4, 1, 40, 80)
    out = model(video, logmel, neg)
    assert out["video_emb"] is None and out["audio_emb"] is None and out["neg_audio_emb"] is None
    assert out["sync_logit"].shape == (4,) and out["neg_sync_logit"].shape == (4, 2)
    # Column 0 scores the loader's negative, column 1 the partner clip's audio.
    torch.testing.assert_close(out["sync_logit"], model.sync_logit(video, logmel))
    torch.testing.assert_close(out["neg_sync_logit"][:, 0], model.sync_logit(video, neg))
    partner = logmel[torch.tensor([1, 0, 3, 2])]
    torch.testing.assert_close(out["neg_sync_logit"][:, 1], model.sync_logit(video, partner))
    assert model(video, logmel)["neg_sync_logit"].shape == (4, 1)
    assert model(video[:1], logmel[:1])["neg_sync_logit"] is None
    with pytest.raises(ValueError, match="negative audio shape"):
        model(video, logmel, neg[:2])
    with pytest.raises(ValueError, match="log-mel"):
        model(video, logmel[:, 0])


def test_early_fusion_uses_audio_and_trains_every_parameter():
    torch.manual_seed(0)
    for stage in (1, 2, 3):
        model = build_model(tiny_model_config(arch="early_fusion", fusion_stage=stage)).train()
        video, logmel = torch.randn(4, 3, 8, 32, 32), torch.randn(4, 1, 40, 80)
        out = model(video, logmel, torch.randn(4, 1, 40, 80))
        (out["sync_logit"].sum() - out["neg_sync_logit"].sum()).backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
        assert not missing, (stage, missing)
        assert len(model.audio) == stage  # no audio stage without a gradient
    model.eval()
    with torch.no_grad():
        a = model.sync_logit(video, logmel)
        b = model.sync_logit(video, silent_logmel(logmel))
    assert not torch.allclose(a, b)


def test_batch_partner_pairs_never_cross_ranks():
    assert batch_partner(1) is None
    assert batch_partner(4).tolist() == [1, 0, 3, 2]
    assert batch_partner(3).tolist() == [1, 2, 0]
    # A global batch of 8 on 1 rank and on 2 ranks of 4: the same partner for every clip.
    whole = batch_partner(8).tolist()
    halves = [g + 4 * r for r in range(2) for g in batch_partner(4).tolist()]
    assert whole == halves


def test_silent_logmel_is_the_loaders_log_mel_of_silence():
    import numpy as np

    from avts_dist.data.decode import logmel

    silence = logmel(np.zeros(16000, dtype=np.float32), 16000, 40)[None]
    torch.testing.assert_close(silent_logmel(silence), silence)


def test_early_fusion_video_weights_load_into_a_plain_video_net_without_the_audio():
    """The mechanism of its single-modality failure: the export's ``video`` part loads into a
    plain video net, whose later stages then run without the audio they were trained with."""
    torch.manual_seed(0)
    cfg = tiny_model_config(arch="early_fusion")
    model = build_model(cfg).eval()
    net = build_video_net(cfg).eval()
    net.load_state_dict(model.video.state_dict(), strict=True)
    video, logmel = torch.randn(2, 3, 8, 32, 32), torch.randn(2, 1, 40, 80)
    with torch.no_grad():
        fused = model.encode_video(video) + model.encode_audio(logmel, 8)[..., None, None]
        trunk_with_audio = model._video_stages(fused, 2, 4).mean(dim=(2, 3, 4))
        alone = net.features(video, layer="pool")
    assert not torch.allclose(alone, trunk_with_audio, atol=1e-3)
    payload = export_payload(model, cfg)
    assert set(payload["video"]) == set(net.state_dict())
    with pytest.raises(RuntimeError):  # there is no audio net to take the audio part
        build_model(tiny_model_config()).audio.load_state_dict(payload["audio"], strict=True)


def test_fused_classifier_fine_tunes_the_whole_trunk():
    torch.manual_seed(0)
    model = build_model(tiny_model_config(arch="early_fusion"))
    clf = FusedClassifier(model, num_classes=3).train()
    video, logmel = torch.randn(4, 3, 8, 32, 32), torch.randn(4, 1, 40, 80)
    logits = clf(video, logmel)
    assert logits.shape == (4, 3)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 0])).backward()
    trained = {n for n, p in clf.named_parameters() if p.grad is not None and p.grad.any()}
    assert "fc.weight" in trained and "model.audio.0.0.weight" in trained
    assert not any(n.startswith("model.heads.sync") for n in trained)  # not used downstream
    with pytest.raises(ValueError, match="num_classes"):
        FusedClassifier(model, num_classes=0)


def test_model_arch_keys_are_checked():
    with pytest.raises(ConfigError, match="model.arch"):
        load_config(None, ["model.arch=late_fusion"])
    with pytest.raises(ConfigError, match="model.fusion_stage"):
        load_config(None, ["model.fusion_stage=4"])


# -- classification heads ------------------------------------------------------------------------


def test_frozen_classifier_trains_only_its_head():
    torch.manual_seed(0)
    backbone = build_video_net(tiny_model_config())
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    clf = VideoClassifier(backbone, num_classes=5, freeze_backbone=True, layer="layer3").train()
    assert not clf.backbone.training  # BN statistics are kept as pretrained
    logits = clf(torch.randn(2, 3, 8, 32, 32))
    assert logits.shape == (2, 5)
    logits.sum().backward()
    assert clf.fc.weight.grad is not None and clf.fc.in_features == 32
    assert all(p.grad is None for p in clf.backbone.parameters())
    for k, v in clf.backbone.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_finetune_classifier_updates_backbone():
    torch.manual_seed(0)
    clf = AudioClassifier(AudioVGG("tiny", width=8), num_classes=3, dropout=0.0).train()
    clf(torch.randn(2, 1, 40, 50)).sum().backward()
    assert clf.backbone.layer1[0].weight.grad is not None
    assert clf.backbone.training


# -- exported weights ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    cfg = tiny_model_config(fusion_head=True)
    model = build_model(cfg).eval()
    path = str(tmp_path_factory.mktemp("export") / "model.pt")
    save_exported(export_payload(model, cfg, source_checkpoint="ckpt/step-5", step=5), path)
    return model, path


def test_export_roundtrip(exported):
    model, path = exported
    payload = torch.load(path, weights_only=True)  # the contract: plain weights-only file
    assert payload["format_version"] == 1 and payload["step"] == 5
    assert payload["model_config"]["video_width"] == 8
    assert all(v.dtype in (torch.float32, torch.int64) for v in payload["video"].values())
    video, logmel = torch.randn(2, 3, 8, 32, 32), torch.randn(2, 1, 40, 80)
    vnet = load_pretrained(path, part="video").eval()
    anet = load_pretrained(path, part="audio").eval()
    torch.testing.assert_close(vnet.features(video), model.video.features(video))
    torch.testing.assert_close(anet(logmel), model.audio(logmel))
    clf = VideoClassifier(load_pretrained(path), num_classes=4, freeze_backbone=True).eval()
    torch.testing.assert_close(clf.backbone.features(video), model.video.features(video))
    assert clf(video).shape == (2, 4)
    aclf = AudioClassifier(load_pretrained(path, part="audio"), num_classes=3, layer="layer3")
    assert aclf.fc.in_features == 32
    full = load_pretrained(path, part="model").eval()
    torch.testing.assert_close(
        full(video, logmel)["sync_logit"], model(video, logmel)["sync_logit"]
    )


def test_export_errors_name_the_problem(exported, tmp_path):
    _, path = exported
    with pytest.raises(ExportError, match="not found"):
        load_exported(str(tmp_path / "missing.pt"))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ExportError, match="not an exported weights file"):
        load_exported(str(garbage))
    payload = load_exported(path)
    future = tmp_path / "future.pt"
    torch.save({**payload, "format_version": 99}, future)
    with pytest.raises(ExportError, match="format_version 99"):
        load_exported(str(future))
    wrong = tmp_path / "wrong.pt"
    torch.save({**payload, "model_config": {**payload["model_config"], "video_width": 16}}, wrong)
    with pytest.raises(ExportError, match="video weights do not match"):
        load_pretrained(str(wrong), part="video")
    bad_cfg = tmp_path / "badcfg.pt"
    torch.save({**payload, "model_config": {**payload["model_config"], "video_arch": "x"}}, bad_cfg)
    with pytest.raises(ExportError, match="model.video_arch"):
        load_pretrained(str(bad_cfg), part="video")


def test_export_roundtrip_on_s3(exported, s3_bucket):
    model, path = exported
    url = f"s3://{s3_bucket}/exports/model.pt"
    save_exported(load_exported(path), url)
    anet = load_pretrained(url, part="audio").eval()
    logmel = torch.randn(2, 1, 40, 80)
    torch.testing.assert_close(anet(logmel), model.audio(logmel))


def test_temporal_bins_keep_event_times_in_the_embedding():
    from avts_dist.models.avts import _time_bins

    feats_BCT = torch.arange(2 * 3 * 8, dtype=torch.float32).reshape(2, 3, 8)
    binned = _time_bins(feats_BCT, 4)
    assert binned.shape == (2, 12)
    # Bin j of channel c averages frames 2j and 2j+1.
    assert torch.equal(binned.reshape(2, 3, 4), feats_BCT.reshape(2, 3, 4, 2).mean(-1))

    torch.manual_seed(0)
    model = build_model(tiny_model_config(video_arch="mc3_18", temporal_bins=4)).eval()
    assert model.heads["video"][0].in_features == 4 * model.video.feature_dim
    assert model.heads["audio"][0].in_features == 4 * model.audio.feature_dim
    video, logmel = torch.randn(2, 3, 8, 32, 32), torch.randn(2, 1, 40, 101)
    with torch.no_grad():
        # The heads see layer-4 features pooled over space/frequency only, then into time bins.
        v_BCT = model.video.features(video, layer="layer4", pooled=False).mean(dim=(3, 4))
        a_BCT = model.audio.features(logmel, layer="layer4", pooled=False).mean(dim=2)
        assert v_BCT.shape[2] == 8  # MC3 keeps every frame, so the bins hold distinct times
        torch.testing.assert_close(
            model.encode_video(video), model.heads["video"](_time_bins(v_BCT, 4))
        )
        torch.testing.assert_close(
            model.encode_audio(logmel), model.heads["audio"](_time_bins(a_BCT, 4))
        )
    with pytest.raises(ConfigError, match="model.temporal_bins"):
        load_config(None, ["model.temporal_bins=0"])
