"""The model card: ``MODEL_CARD.md`` beside an export, written by ``avts export``.

It gives the architecture, the input spec (from the run's resolved config), the pretraining
data and steps, the evaluation figures at export time and how to load the weights. Storage
options and credentials are never written.
"""

from __future__ import annotations

from typing import Any

import torch

from avts_dist.config import ModelConfig
from avts_dist.data.decode import KINETICS_MEAN, KINETICS_STD
from avts_dist.export.format import model_config_from_export
from avts_dist.storage import get_fs

__all__ = ["MODEL_CARD", "model_card", "model_card_path", "write_model_card"]

MODEL_CARD = "MODEL_CARD.md"
_TORCHVISION_LAYERS = [2, 2, 2, 2]


def model_card_path(weights_path: str) -> str:
    """``MODEL_CARD.md`` in the folder of ``weights_path`` (local path or URL)."""
    parent = weights_path.rsplit("/", 1)[0] if "/" in weights_path else ""
    return f"{parent}/{MODEL_CARD}" if parent else MODEL_CARD


_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def _num_params(state: dict[str, torch.Tensor]) -> int:
    # Parameters only: BatchNorm running statistics are buffers.
    return sum(v.numel() for k, v in state.items() if not k.endswith(_BUFFER_SUFFIXES))


def _fmt_metric(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def model_card(
    payload: dict[str, Any],
    *,
    weights_name: str = "model.pt",
    config: dict[str, Any] | None = None,
    trainer_state: dict[str, Any] | None = None,
    eval_metrics: dict[str, float] | None = None,
) -> str:
    """The Markdown model card of an export.

    ``config`` is the run's resolved config (``config_to_dict``; from the checkpoint), which
    gives the input spec and the pretraining data; ``trainer_state`` the checkpoint's
    ``trainer`` entry (samples seen, validation figures); ``eval_metrics`` any evaluation
    figures to list. Storage options and credentials are never written.
    """
    mc = model_config_from_export(payload)
    cfg = config or {}
    data = cfg.get("data", {})
    trainer = trainer_state or {}
    step = int(payload.get("step", 0))
    video_params = _num_params(payload["video"])
    if "audio" not in payload:
        return _video_ssl_card(payload, mc, weights_name, video_params, step)
    audio_params = _num_params(payload["audio"])
    # Both backbones end in 8 x width channels (BasicBlock / VGG stage widths), pooled.
    video_dim = mc.video_width * 8
    torchvision_layout = mc.video_layers == _TORCHVISION_LAYERS and mc.video_width == 64
    lines = [
        f"# AVTS pretrained weights: {mc.video_arch} video net + {mc.audio_arch} audio net",
        "",
        "Self-supervised audio-visual temporal synchronization (AVTS; Korbar, Tran, Torresani, "
        "NeurIPS 2018): a video network and an audio network trained to tell whether a clip's "
        "audio and video are in sync. Each network can be used alone.",
        "",
        "## Load it",
        "",
        "```python",
        "from avts_dist.export import load_pretrained",
        f'video_net = load_pretrained("{weights_name}", part="video").eval()  # or part="audio"',
        f"features = video_net(video_BCTHW)  # [B, {video_dim}] pooled features; input spec below",
        "```",
        "",
        f'Without avts_dist: `torch.load("{weights_name}", weights_only=True)` is a dict of '
        "plain state dicts (`video`, `audio`, `heads`) plus `model_config`.",
    ]
    if torchvision_layout:
        lines += [
            f"The `video` state dict has the keys and shapes of torchvision's `{mc.video_arch}` "
            f"(no `fc`): `torchvision.models.video.{mc.video_arch}(num_classes=400)"
            f'.load_state_dict(sd["video"], strict=False)` leaves only `fc` untrained.',
        ]
    lines += [
        "",
        "## Architecture",
        "",
        "| part | definition | parameters | output |",
        "|---|---|---|---|",
        f"| video | `{mc.video_arch}`, width {mc.video_width}, stage depths {mc.video_layers}"
        f"{' (torchvision layout)' if torchvision_layout else ''} | {video_params:,} "
        f"| [B, {video_dim}] |",
        f"| audio | `{mc.audio_arch}` 2D CNN on log-mel, width {mc.audio_width} | "
        f"{audio_params:,} | [B, {mc.audio_width * 8}] |",
        f"| heads | embedding MLPs to {mc.embed_dim} dims, {mc.temporal_bins} time bin(s)"
        f"{', fusion sync head' if mc.fusion_head else ''} | "
        f"{_num_params(payload['heads']):,} | sync embeddings |",
    ]
    if mc.init_from:
        lines += ["", f"The video net started from `{mc.init_from}` (model.init_from)."]
    if data:
        lines += _input_spec(data, KINETICS_MEAN, KINETICS_STD)
    lines += ["", "## Pretraining", ""]
    samples = trainer.get("samples_seen") or step * int(data.get("global_batch_size", 0))
    lines.append(f"- steps: {step:,}; clips seen: {samples:,}")
    if data:
        lines.append(
            f"- data: `{data.get('url')}` split `{data.get('split')}`, global batch "
            f"{data.get('global_batch_size')}, seed {data.get('seed')}"
        )
    loss = cfg.get("loss")
    if loss:
        lines.append(f"- loss: {loss.get('kind')} (margin {loss.get('margin')})")
    curriculum = cfg.get("curriculum")
    if curriculum:
        lines.append(
            f"- curriculum ({'on' if curriculum.get('enabled') else 'off'}): "
            + _stages(curriculum.get("stages", []))
        )
    lines.append(f"- source checkpoint: `{payload.get('source_checkpoint') or 'unknown'}`")
    figures = {**(trainer.get("val_metrics") or {}), **(eval_metrics or {})}
    lines += ["", "## Evaluation", ""]
    if figures:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt_metric(v)} |" for k, v in sorted(figures.items())]
        lines += [
            "",
            "`val/*`: sync accuracy on held-out clips during pretraining (easy or hard negatives).",
        ]
    else:
        lines.append(
            "No evaluation figures at export time: run `avts eval ... --checkpoint` on "
            "these weights."
        )
    return "\n".join(lines) + "\n"


def _video_ssl_card(
    payload: dict[str, Any], mc: ModelConfig, weights_name: str, video_params: int, step: int
) -> str:
    """The short card of a video-only export (``train.objective=video_ssl``)."""
    return (
        "\n".join(
            [
                f"# video_ssl pretrained weights: {mc.video_arch} video net (no audio net)",
                "",
                "The video-only self-supervised baseline (CVRL, Qian et al., CVPR 2021): two windows "
                "of each video are a positive pair, InfoNCE over the global batch.",
                "",
                "```python",
                "from avts_dist.export import load_pretrained",
                f'video_net = load_pretrained("{weights_name}", part="video").eval()',
                "```",
                "",
                f"- video: `{mc.video_arch}`, width {mc.video_width}, stage depths "
                f"{mc.video_layers}, {video_params:,} parameters, output [B, {mc.video_width * 8}]",
                f"- projection head (training only): {_num_params(payload['heads']):,} parameters",
                f"- steps: {step:,}; source checkpoint: "
                f"`{payload.get('source_checkpoint') or 'unknown'}`",
            ]
        )
        + "\n"
    )


def _input_spec(data: dict[str, Any], mean, std) -> list[str]:
    frames, fps, size = data["num_frames"], data["fps"], data["size"]
    sr, mels = data["sample_rate"], data["num_mel_bins"]
    win = max(2, round(sr * data["mel_win_ms"] / 1000.0))
    hop = max(1, round(sr * data["mel_hop_ms"] / 1000.0))
    n_fft = 1 << (win - 1).bit_length()
    clip_s = frames / fps
    num_mel_frames = int(round(clip_s * sr)) // hop + 1
    return [
        "",
        "## Input spec",
        "",
        f"One clip is {clip_s:g} s: {frames} frames at {fps:g} fps and the audio of the same span.",
        "",
        f"- **video** `video_BCTHW` = [B, 3, {frames}, {size}, {size}], float32 RGB: frames "
        f"sampled at {fps:g} fps, scaled to [0, 1], short side resized to {size} (bilinear, "
        f"antialiased), centre crop {size}x{size}, then normalised with torchvision's Kinetics "
        f"mean {list(mean)} and std {list(std)}.",
        f"- **audio** `logmel_B1FT` = [B, 1, {mels}, {num_mel_frames}]: mono at {sr} Hz, "
        f"STFT with a {win}-sample Hann window ({data['mel_win_ms']:g} ms), hop {hop} "
        f"({data['mel_hop_ms']:g} ms), n_fft {n_fft}, centred; power spectrum through {mels} "
        "HTK triangular mel filters from 0 Hz to Nyquist; natural log of (mel + 1e-6).",
        "- The same transforms in code: `avts_dist.data.decode.decode_video(mp4_bytes, start_s, "
        f"{frames}, {fps:g}, {size}, train=False)` and "
        f"`logmel(decode_audio(mp4_bytes, {sr}, start_s, start_s + {clip_s:g}), {sr}, {mels}, "
        f"{data['mel_win_ms']:g}, {data['mel_hop_ms']:g})`.",
    ]


def _stages(stages: list[dict[str, Any]]) -> str:
    parts = []
    for st in stages:
        mix = ", ".join(f"{k} {v:g}" for k, v in (st.get("negative_mix") or {}).items())
        if st.get("until_step") is not None:
            until = f" until step {st['until_step']}"
        elif st.get("until_epoch") is not None:
            until = f" until epoch {st['until_epoch']}"
        elif st.get("plateau_metric"):
            until = f" until {st['plateau_metric']} plateaus"
        else:
            until = ""
        parts.append(f"{st.get('name')} ({mix}){until}")
    return " -> ".join(parts)


def write_model_card(
    payload: dict[str, Any],
    weights_path: str,
    *,
    storage_options: dict | None = None,
    **card_kwargs: Any,
) -> str:
    """Writes ``MODEL_CARD.md`` beside ``weights_path`` (local or fsspec URL); returns its path.

    ``card_kwargs`` go to :func:`model_card` (``config``, ``trainer_state``, ``eval_metrics``).
    """
    path = model_card_path(weights_path)
    name = weights_path.rstrip("/").rsplit("/", 1)[-1]
    text = model_card(payload, weights_name=name, **card_kwargs)
    fs, fs_path = get_fs(path, storage_options)
    with fs.open(fs_path, "w") as f:
        f.write(text)
    return path
