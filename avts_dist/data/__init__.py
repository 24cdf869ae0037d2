"""avts_dist.data: shards and index, streaming, decoding, AVTS pairs, the synthetic corpus and the
dataset converters.

Names are imported lazily, so that commands which only touch shards (`avts synth`, `avts inspect`)
start without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AVLoader": "avts_dist.data.loader",
    "build_loader": "avts_dist.data.loader",
    "DatasetError": "avts_dist.data.index",
    "DatasetIndex": "avts_dist.data.index",
    "SkippedClipsError": "avts_dist.data.health",
    "ShardWriter": "avts_dist.data.writer",
    "read_member": "avts_dist.data.index",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'avts_dist.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
