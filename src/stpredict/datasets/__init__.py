"""Synthetic data with known ground truth: :func:`synthetic` (an H&E-like section with expression density)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import lazy_loader

if TYPE_CHECKING:
    from ._synthetic import synthetic

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "_synthetic": ["synthetic"],
    },
)
