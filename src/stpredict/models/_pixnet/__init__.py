"""The PixNet family: the user API (:mod:`._model`), the ``nn.Module`` (:mod:`._module`) and its decoder.

:class:`PixNet` knows genes, resolution and checkpoints and trains through :mod:`stpredict.models._training`;
:class:`~._module.PixNetModule` is a plain network on tensors (encoder pyramid, U-Net decoder, 1×1 head), built
lazily so that importing this package does not import torch.
"""

from __future__ import annotations

from ._model import PixNet

__all__ = ["PixNet"]
