"""Synthetic data with known ground truth: :func:`synthetic` (an H&E-like section with expression density)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from stpredict._lazy import lazy_getattr

if TYPE_CHECKING:
    from ._synthetic import synthetic

_LAZY = {"synthetic": "._synthetic"}

__all__ = ["synthetic"]


def __getattr__(name: str) -> Any:
    return lazy_getattr(__name__, globals(), _LAZY, name)


def __dir__() -> list[str]:
    return sorted(__all__)
