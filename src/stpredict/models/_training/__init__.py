"""Training shared by the model families: the LightningModule plan (:mod:`._plan`) and the fit loop (:mod:`._fit`).

A model hands its ``nn.Module`` and geometry to :func:`fit`, which builds the data (:mod:`stpredict.models._data`),
wraps the network in the training plan and runs the Lightning trainer. This package re-exports the names the rest of
:mod:`stpredict.models` uses.
"""

from __future__ import annotations

from ._fit import fit, fit_options, resolve_accelerator
from ._plan import IMAGENET_MEAN, IMAGENET_STD, normalize_tiles

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "fit", "fit_options", "normalize_tiles", "resolve_accelerator"]
