"""The package version, in one place: pyproject reads it (hatch), and modules import it from here."""

from __future__ import annotations

__version__ = "0.1.0"
