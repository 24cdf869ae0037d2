"""avts_dist.export: weights in and out of the models, on any fsspec URL.

- ``format.py``: the export file (``export_payload``, ``save_exported``, ``load_exported``) and
  the one weights-file reader (``read_torch_file``).
- ``weights.py``: the one weights loader (``load_weights``), ``load_pretrained(path_or_url,
  part=...)`` and ``pretrained_part(payload, part)``, and ``model.init_from``
  (``init_video_from``, ``build_initial_model``).
- ``card.py``: ``MODEL_CARD.md`` (``model_card``, ``write_model_card``).
- ``consolidate.py``: ``export_checkpoint``, a training checkpoint -> an export (``avts export``).
  It reads DeepSpeed checkpoints, so it is not imported here: ``import avts_dist.export`` loads
  neither the trainer nor DeepSpeed.
"""

from avts_dist.export.card import MODEL_CARD, model_card, model_card_path, write_model_card
from avts_dist.export.format import (
    EXPORT_FORMAT_VERSION,
    ExportError,
    export_payload,
    load_exported,
    model_config_from_export,
    read_torch_file,
    require_audio,
    save_exported,
)
from avts_dist.export.weights import (
    PARTS,
    build_initial_model,
    init_video_from,
    load_pretrained,
    load_weights,
    pretrained_part,
    state_dict_mismatches,
)

__all__ = [
    "EXPORT_FORMAT_VERSION",
    "MODEL_CARD",
    "PARTS",
    "ExportError",
    "build_initial_model",
    "export_payload",
    "init_video_from",
    "load_exported",
    "load_pretrained",
    "load_weights",
    "model_card",
    "model_card_path",
    "model_config_from_export",
    "pretrained_part",
    "read_torch_file",
    "require_audio",
    "save_exported",
    "state_dict_mismatches",
    "write_model_card",
]
