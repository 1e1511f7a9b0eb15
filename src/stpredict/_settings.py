"""Global settings: device, progress bars, verbosity, seeds."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["Settings", "settings"]


@dataclass
class Settings:
    """Library-wide defaults, read by every function that takes the matching argument as ``None``/``"auto"``.

    Attributes
    ----------
    device
        ``"auto"`` picks CUDA, then MPS, then CPU; or a torch device string such as ``"cuda:1"``.
    show_progress_bar
        Show progress bars on long work (tile loops, training, chunked aggregation).
    verbosity
        Level of the ``stpredict`` logger; handlers are left to the user.
    n_jobs
        Threads for numba kernels; ``None`` leaves numba's default (all cores).
    um_coordinate_system
        Name of the coordinate system in micrometres that :func:`stpredict.pp.calibrate` writes.
    """

    device: str = "auto"
    show_progress_bar: bool = True
    verbosity: Literal["debug", "info", "warning", "error"] = "warning"
    n_jobs: int | None = None
    um_coordinate_system: str = field(default="um")

    def __post_init__(self) -> None:
        object.__setattr__(self, "_initialised", True)

    def __setattr__(self, name: str, value: object) -> None:
        super().__setattr__(name, value)
        # Only an explicit change sets the level: creating the settings must not override the user's logging.
        if name == "verbosity" and getattr(self, "_initialised", False):
            logging.getLogger("stpredict").setLevel(str(value).upper())


settings = Settings()
