"""Exceptions with messages that name the fix."""

from __future__ import annotations

__all__ = ["CalibrationError", "CoordinateSystemError", "InputError"]


class InputError(ValueError):
    """The caller's data cannot be used as given; the message says how to fix it."""


class CalibrationError(InputError):
    """An element has no known physical pixel size (µm per pixel)."""


class CoordinateSystemError(InputError):
    """Two elements share no coordinate system, so they cannot be related."""
