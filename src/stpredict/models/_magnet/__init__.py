"""MagNet (SPEC.md §3): multi-resolution cross-attention and graph attention for Visium HD bins."""

from __future__ import annotations

from ._model import MagNet

__all__ = ["MagNet"]
