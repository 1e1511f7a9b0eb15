"""Lazy attribute resolution for subpackages, so that importing one never pulls in heavy libraries."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["lazy_getattr"]


def lazy_getattr(package: str, namespace: dict[str, Any], table: dict[str, str], name: str) -> Any:
    """Resolve ``name`` from ``table`` (public name → private module), cache it in ``namespace``."""
    if name not in table:
        msg = f"module {package!r} has no attribute {name!r}"
        raise AttributeError(msg)
    value = getattr(importlib.import_module(table[name], package), name)
    namespace[name] = value
    return value
