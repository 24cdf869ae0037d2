"""One audio-visual network that fuses early: the seed's open question 1 (``model.arch``).

The video stream runs its stem and stages ``1..fusion_stage``; the audio stream runs the same
number of log-mel stages. Audio features are pooled over frequency, resampled to the video's
time steps, projected to the video's channels (a 1x1 conv) and added to every spatial position:
from there on one shared 3D trunk (the video net's later stages) sees both modalities, and a
small MLP on its time-binned output gives the sync logit (> 0: in sync).

What it trains on is the two-stream model's sync objective, as a binary decision per pair
(``loss_fn``'s BCE-only mode): the positive, the loader's negative (easy / hard / super-hard, as
the curriculum says) and one easy negative from the batch, the audio of the partner clip
(``batch_partner``). There are no per-modality embeddings, so the global batch cannot supply
easy negatives cheaply: every pair costs a trunk pass.

State-dict layout, kept close to the two-stream model so the export format holds it:
``video`` (a whole ``VideoResNet``: stem and early stages before the fusion, later stages after),
``audio`` (the audio stages before the fusion, an ``nn.Sequential``) and ``heads`` (``fuse``,
the audio projection, and ``sync``). ``video`` loads into a plain video net, which then has lost
the audio input its later stages were trained with: see docs/models.md for what that costs.
Pure ``torch.nn``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from avts_dist.config import ModelConfig
from avts_dist.models.audio import AudioVGG
from avts_dist.models.video import VideoResNet

__all__ = ["EarlyFusionModel", "FusedClassifier", "batch_partner", "silent_logmel"]


def batch_partner(batch: int, device: torch.device | None = None) -> torch.Tensor | None:
    """Index of each sample's in-batch easy negative: its neighbour in pairs (0, 1), (2, 3)...

    Pairs never straddle a rank boundary when the local batch is even (every rank's slice starts
    at a multiple of it), so the same global batch gives the same pairs at any world size. An odd
    batch pairs each sample with the next (a cycle); a batch of one has no partner (None).
    """
    if batch < 2:
        return None
    idx = torch.arange(batch, device=device)
    return idx ^ 1 if batch % 2 == 0 else (idx + 1) % batch


def silent_logmel(like_B1FT: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The log-mel of digital silence, shaped like ``like_B1FT``: ``log(eps)`` everywhere, with
    the ``eps`` of ``avts_dist.data.decode.logmel``. What the audio branch can be given for a
    clip without audio."""
    return torch.full_like(like_B1FT, math.log(eps))


class EarlyFusionModel(nn.Module):
    """Early audio-visual fusion; :meth:`forward` keeps the two-stream model's contract."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        stage = cfg.fusion_stage
        self.video = VideoResNet(
            arch=cfg.video_arch,
            layers=cfg.video_layers,
            width=cfg.video_width,
            num_classes=0,
            activation_checkpointing=cfg.activation_checkpointing,
            channels_last_3d=cfg.channels_last_3d,
        )
        audio = AudioVGG(cfg.audio_arch, cfg.audio_width, cfg.activation_checkpointing)
        # Only the stages before the fusion: later ones would be parameters without gradients.
        self.audio = nn.Sequential(*(getattr(audio, f"layer{i}") for i in range(1, stage + 1)))
        audio_dim = audio.feature_dim_of(f"layer{stage}")
        video_dim = self.video.feature_dim_of(f"layer{stage}")
        trunk_dim = cfg.temporal_bins * self.video.feature_dim
        hidden = cfg.head_hidden_dim or cfg.embed_dim
        self.heads = nn.ModuleDict(
            {
                "fuse": nn.Conv1d(audio_dim, video_dim, kernel_size=1),
                "sync": nn.Sequential(
                    nn.Linear(trunk_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1)
                ),
            }
        )

    def _video_stages(self, x: torch.Tensor, first: int, last: int) -> torch.Tensor:
        for i in range(first, last + 1):
            x = self.video._run(getattr(self.video, f"layer{i}"), x)
        return x

    def encode_video(self, video_BCTHW: torch.Tensor) -> torch.Tensor:
        """Video features at the fusion point ``[B, C, T', H', W']``."""
        if self.config.channels_last_3d:
            video_BCTHW = video_BCTHW.contiguous(memory_format=torch.channels_last_3d)
        x = self.video._run(self.video.stem, video_BCTHW)
        return self._video_stages(x, 1, self.config.fusion_stage)

    def encode_audio(self, logmel_B1FT: torch.Tensor, num_steps: int) -> torch.Tensor:
        """Audio features resampled to ``num_steps`` video time steps and projected: ``[B, C, T']``."""
        if logmel_B1FT.dim() != 4 or logmel_B1FT.shape[1] != 1:
            raise ValueError(f"expected log-mel [B, 1, F, T], got shape {list(logmel_B1FT.shape)}")
        feats_BCT = self.audio(logmel_B1FT).mean(dim=2)
        return self.heads["fuse"](F.adaptive_avg_pool1d(feats_BCT, num_steps))

    def _trunk(self, video_feats: torch.Tensor, audio_BCT: torch.Tensor) -> torch.Tensor:
        x = video_feats + audio_BCT[:, :, :, None, None]
        return self._video_stages(x, self.config.fusion_stage + 1, 4)

    def fuse_and_score(self, video_feats: torch.Tensor, audio_BCT: torch.Tensor) -> torch.Tensor:
        """Sync logits ``[B]`` of video features at the fusion point plus projected audio."""
        x = self._trunk(video_feats, audio_BCT)
        return self.heads["sync"](_time_bins(x.mean(dim=(3, 4)), self.config.temporal_bins))

    def features(self, video_BCTHW: torch.Tensor, logmel_B1FT: torch.Tensor) -> torch.Tensor:
        """Pooled audio-visual features ``[B, C]`` of the shared trunk (for downstream heads)."""
        video_feats = self.encode_video(video_BCTHW)
        audio = self.encode_audio(logmel_B1FT, video_feats.shape[2])
        return self._trunk(video_feats, audio).mean(dim=(2, 3, 4))

    def sync_logit(
        self, video_BCTHW: torch.Tensor, logmel_B1FT: torch.Tensor | None
    ) -> torch.Tensor:
        """Logits ``[B]`` of (video, audio) pairs; ``None`` audio is silence (no audio track)."""
        video_feats = self.encode_video(video_BCTHW)
        if logmel_B1FT is None:
            raise ValueError("sync_logit needs audio; pass silent_logmel(...) for a silent clip")
        audio = self.encode_audio(logmel_B1FT, video_feats.shape[2])
        return self.fuse_and_score(video_feats, audio).squeeze(1)

    def forward(
        self,
        video_BCTHW: torch.Tensor,
        logmel_B1FT: torch.Tensor,
        neg_logmel_B1FT: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """The two-stream contract, without embeddings (``video_emb`` etc. are None):

        ``sync_logit`` [B] of the in-sync pairs, ``neg_sync_logit`` [B, K] of the negatives:
        column 0 the loader's negative (when given), then the in-batch easy negative (the
        partner's audio, when the batch has two or more clips).
        """
        batch = video_BCTHW.shape[0]
        if logmel_B1FT.shape[0] != batch:
            raise ValueError(f"video batch {batch} != audio batch {logmel_B1FT.shape[0]}")
        if neg_logmel_B1FT is not None and neg_logmel_B1FT.shape != logmel_B1FT.shape:
            raise ValueError(
                f"negative audio shape {list(neg_logmel_B1FT.shape)} != "
                f"audio shape {list(logmel_B1FT.shape)}"
            )
        video_feats = self.encode_video(video_BCTHW)
        steps = video_feats.shape[2]
        logmels = [logmel_B1FT] + ([neg_logmel_B1FT] if neg_logmel_B1FT is not None else [])
        # One pass per stage over every audio and every pair: one BN batch, as two-stream does.
        audio = self.encode_audio(torch.cat(logmels), steps).split(batch)
        pairs = list(audio)
        partner = batch_partner(batch, video_BCTHW.device)
        if partner is not None:
            pairs.append(audio[0][partner])
        logits = self.fuse_and_score(video_feats.repeat(len(pairs), 1, 1, 1, 1), torch.cat(pairs))
        logits = logits.view(len(pairs), batch).T  # [B, 1 + K]
        return {
            "video_emb": None,
            "audio_emb": None,
            "neg_audio_emb": None,
            "sync_logit": logits[:, 0],
            "neg_sync_logit": logits[:, 1:] if len(pairs) > 1 else None,
        }


def _time_bins(feats_BCT: torch.Tensor, num_bins: int) -> torch.Tensor:
    return F.adaptive_avg_pool1d(feats_BCT, num_bins).flatten(1)


class FusedClassifier(nn.Module):
    """The early-fusion trunk with a new linear head: ``(video, log-mel) -> class logits``.

    Fine-tunes the whole network (the sync head is not used). Video-only use has to decide what
    the audio branch gets: ``silent_logmel(...)`` is the honest choice for a clip without audio.
    """

    def __init__(self, model: EarlyFusionModel, num_classes: int, dropout: float = 0.5) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.model = model
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(model.video.feature_dim, num_classes)

    def forward(self, video_BCTHW: torch.Tensor, logmel_B1FT: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.model.features(video_BCTHW, logmel_B1FT)))
