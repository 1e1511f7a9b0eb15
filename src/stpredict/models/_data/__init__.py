"""Training data shared by every model family: sections of measured units, windows, augmentation, datasets, batches.

A *section* is one slide: its H&E image (read lazily from dask) and its tables of measured units as footprints and
targets (:mod:`._sections`). Tiles are read around units and resampled to the model's resolution (:mod:`._windows`),
flipped, rotated and stain-jittered (:mod:`._augment`), drawn reproducibly per epoch (:mod:`._datasets`) and
stacked into batches (:mod:`._collate`). This package re-exports the names the rest of :mod:`stpredict.models` uses.
"""

from __future__ import annotations

from ._augment import augment_geometry, hed_jitter
from ._collate import collate_tiles, collate_units, sparse_weights
from ._datasets import CoverTileDataset, EpochSampler, TileDataset, UnitCropDataset
from ._sections import Section, UnitSet, build_sections, log1p_cpm, split_by_position
from ._windows import read_window, window_geometry

__all__ = [
    "CoverTileDataset",
    "EpochSampler",
    "Section",
    "TileDataset",
    "UnitCropDataset",
    "UnitSet",
    "augment_geometry",
    "build_sections",
    "collate_tiles",
    "collate_units",
    "hed_jitter",
    "log1p_cpm",
    "read_window",
    "sparse_weights",
    "split_by_position",
    "window_geometry",
]
