"""Models: PixNet, MagNet, the baselines, and checkpoint loading. torch loads only when a model is used."""

from __future__ import annotations

from typing import TYPE_CHECKING

import lazy_loader

if TYPE_CHECKING:
    from ._base import DenseModel
    from ._baselines import EmbeddingRidge, SpotCNN
    from ._io import load
    from ._magnet import MagNet
    from ._pixnet import PixNet

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "_base": ["DenseModel"],
        "_baselines": ["EmbeddingRidge", "SpotCNN"],
        "_io": ["load"],
        "_magnet": ["MagNet"],
        "_pixnet": ["PixNet"],
    },
)
