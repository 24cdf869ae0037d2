"""avts_dist.models: the video and audio subnetworks, the two-stream AVTS model and the early
fusion network (``model.arch``). Architecture only.

Pure ``torch.nn`` (no ``torch.distributed``, no file I/O): parallelism is applied from outside,
and weights are read and written by ``avts_dist.export``.

- ``r2plus1d_18()``, ``mc3_18()``, ``r3d_18()``: torchvision state_dict-compatible video nets.
- ``build_video_net(cfg.model)``, ``build_audio_net(cfg.model)``: the two backbones.
- ``build_model(cfg.model, objective)``: the registry (``model_names()``, ``register_model``):
  ``AVTSModel``, ``EarlyFusionModel`` or ``VideoSSLModel`` (``train.objective=video_ssl``).
- ``VideoClassifier`` / ``AudioClassifier``: a subnetwork alone, with a classification head;
  ``ConcatClassifier``: both, their pooled features concatenated (multimodal fine-tuning).
"""

from avts_dist.models.audio import AUDIO_ARCHS, AudioVGG, audio_vgg
from avts_dist.models.avts import AVTSModel, EmbeddingHead, FusionHead
from avts_dist.models.backbones import build_audio_net, build_video_net
from avts_dist.models.classifiers import (
    AudioClassifier,
    ConcatClassifier,
    StreamClassifier,
    VideoClassifier,
)
from avts_dist.models.early_fusion import (
    EarlyFusionModel,
    FusedClassifier,
    batch_partner,
    silent_logmel,
)
from avts_dist.models.registry import build_model, model_name, model_names, register_model
from avts_dist.models.video import (
    VIDEO_ARCHS,
    VideoResNet,
    load_torchvision_weights,
    mc3_18,
    r2plus1d_18,
    r3d_18,
)
from avts_dist.models.video_ssl import VideoSSLModel

__all__ = [
    "AUDIO_ARCHS",
    "VIDEO_ARCHS",
    "AVTSModel",
    "AudioClassifier",
    "AudioVGG",
    "EarlyFusionModel",
    "EmbeddingHead",
    "ConcatClassifier",
    "FusedClassifier",
    "FusionHead",
    "StreamClassifier",
    "VideoClassifier",
    "VideoResNet",
    "VideoSSLModel",
    "audio_vgg",
    "batch_partner",
    "build_audio_net",
    "build_model",
    "build_video_net",
    "load_torchvision_weights",
    "mc3_18",
    "model_name",
    "model_names",
    "r2plus1d_18",
    "r3d_18",
    "register_model",
    "silent_logmel",
]
