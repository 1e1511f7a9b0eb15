"""The spot baselines under the dense-model API: SpotCNN and EmbeddingRidge on a shared sliding-window base.

:mod:`._sliding_window` paints a map from a crop regressor; :mod:`._spotcnn` (ST-Net-like, trained end to end) and
:mod:`._embedding_ridge` (HEST-Benchmark-like, frozen embeddings → PCA → ridge) each add a regressor and its fit.
"""

from __future__ import annotations

from ._embedding_ridge import EmbeddingRidge
from ._spotcnn import SpotCNN

__all__ = ["EmbeddingRidge", "SpotCNN"]
