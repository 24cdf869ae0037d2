"""avts_dist.models: the video and audio subnetworks, the two-stream AVTS model and the early
fusion network (``model.arch``).

Pure ``torch.nn`` (no ``torch.distributed``): parallelism is applied from outside.

- ``r2plus1d_18()``, ``mc3_18()``, ``r3d_18()``: torchvision state_dict-compatible video nets.
- ``build_video_net(cfg.model)``, ``build_audio_net(cfg.model)``, ``build_model(cfg.model)``
  (``AVTSModel`` or ``EarlyFusionModel``).
- ``VideoSSLModel``: the video net + a projection head (``train.objective=video_ssl``).
- ``VideoClassifier`` / ``AudioClassifier``: a subnetwork alone, with a classification head;
  ``ConcatClassifier``: both, their pooled features concatenated (multimodal fine-tuning).
- ``load_pretrained(path_or_url, part="video"|"audio")``: a pretrained subnetwork, plain nn.Module.
- ``load_exported(path)``, ``build_{video,audio}_net_from_export(path)``: pretrained weights.
- ``init_video_from(net, path)``: torchvision-layout weights into a video net (model.init_from).
"""

from avts_dist.models.audio import AUDIO_ARCHS, AudioVGG, audio_vgg
from avts_dist.models.avts import (
    AudioClassifier,
    AVTSModel,
    ConcatClassifier,
    EmbeddingHead,
    FusionHead,
    StreamClassifier,
    VideoClassifier,
    build_audio_net,
    build_model,
    build_video_net,
)
from avts_dist.models.early_fusion import (
    EarlyFusionModel,
    FusedClassifier,
    batch_partner,
    silent_logmel,
)
from avts_dist.models.export import (
    EXPORT_FORMAT_VERSION,
    ExportError,
    build_audio_net_from_export,
    build_model_from_export,
    build_video_net_from_export,
    export_payload,
    load_exported,
    load_pretrained,
    model_card,
    model_card_path,
    model_config_from_export,
    require_audio,
    save_exported,
    write_model_card,
)
from avts_dist.models.init_from import init_video_from
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
    "EXPORT_FORMAT_VERSION",
    "VIDEO_ARCHS",
    "AVTSModel",
    "AudioClassifier",
    "AudioVGG",
    "EarlyFusionModel",
    "EmbeddingHead",
    "ExportError",
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
    "build_audio_net_from_export",
    "build_model",
    "build_model_from_export",
    "build_video_net",
    "build_video_net_from_export",
    "export_payload",
    "init_video_from",
    "load_exported",
    "load_pretrained",
    "load_torchvision_weights",
    "mc3_18",
    "model_card",
    "model_card_path",
    "model_config_from_export",
    "r2plus1d_18",
    "r3d_18",
    "require_audio",
    "save_exported",
    "silent_logmel",
    "write_model_card",
]
