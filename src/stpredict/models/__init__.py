"""Models: PixNet, the baselines, and checkpoint loading. torch loads only when a model is used."""

from __future__ import annotations

from typing import Any

from stpredict._lazy import lazy_getattr

_LAZY = {
    "DenseModel": "._base",
    "EmbeddingRidge": "._baselines",
    "PixNet": "._pixnet",
    "SpotCNN": "._baselines",
    "load": "._io",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    return lazy_getattr(__name__, globals(), _LAZY, name)


def __dir__() -> list[str]:
    return __all__
