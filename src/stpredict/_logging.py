"""One logger for the package; handlers are left to the user (see STYLE.md §8)."""

from __future__ import annotations

import logging

__all__ = ["get_logger"]


def get_logger(name: str) -> logging.Logger:
    """Return the child logger of ``stpredict`` for module ``name``."""
    return logging.getLogger(name if name.startswith("stpredict") else f"stpredict.{name}")
