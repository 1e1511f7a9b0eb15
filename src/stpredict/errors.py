"""The exceptions stpredict raises on purpose, so that a script or pipeline can catch them by name.

Each message names the fix. Bad input is a :class:`InputError` (a :class:`ValueError`), with two refinements for
the physical scale and for elements that cannot be related; an output folder that holds something stpredict did
not write is an :class:`OutputFolderError` (a :class:`FileExistsError`), raised before anything is changed.

Examples
--------
>>> import stpredict as st
>>> issubclass(st.errors.CalibrationError, ValueError)
True
"""

from __future__ import annotations

from ._errors import CalibrationError, CoordinateSystemError, InputError
from ._outputs import OutputFolderError

__all__ = ["CalibrationError", "CoordinateSystemError", "InputError", "OutputFolderError"]
