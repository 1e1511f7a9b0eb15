"""Datasets and samplers: random tiles around measured units, a validation cover, unit crops, epoch indices.

Tiles are ``tile_size`` pixels at the model's µm per pixel. A tile is placed around a random unit (plus jitter) and
read with :func:`~stpredict.models._data.read_window`. Only units whose footprint lies completely inside the tile
are supervised. Every random draw comes from ``numpy.random.default_rng([seed, epoch, index])``, so a tile does not
depend on which worker draws it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from stpredict._errors import InputError
from stpredict.models._footprints import footprint_weights

from ._augment import augment_geometry, hed_jitter
from ._windows import read_window, window_geometry

if TYPE_CHECKING:
    from ._sections import Section, UnitSet

__all__ = ["CoverTileDataset", "EpochSampler", "TileDataset", "UnitCropDataset"]


class _Sampler:
    """Draw a section and an allowed unit, weighted by the number of allowed units."""

    def __init__(self, sections: list[Section]) -> None:
        self.sections = sections
        counts = np.array([[int(u.allowed.sum()) for u in s.units] for s in sections], dtype=np.float64)
        if counts.sum() == 0:
            msg = "No units to train on: every table is empty (or every unit was held out for validation)."
            raise InputError(msg)
        self.probs = (counts / counts.sum()).ravel()
        self.shape = counts.shape
        self.allowed_idx = [[np.flatnonzero(u.allowed) for u in s.units] for s in sections]

    def draw(self, rng: np.random.Generator) -> tuple[int, int, int]:
        flat = int(rng.choice(len(self.probs), p=self.probs))
        s, t = divmod(flat, self.shape[1])
        idx = self.allowed_idx[s][t]
        return s, t, int(idx[rng.integers(len(idx))])


class TileDataset:
    """Random tiles around measured units, with the footprint weights of the units each tile supervises.

    Parameters
    ----------
    sections
        From :func:`build_sections`.
    model_um_per_px
        Resolution of the tiles.
    tile_size
        Tile side in pixels at ``model_um_per_px``.
    output_stride
        Tile pixels per map pixel.
    n_tiles
        Tiles per epoch.
    seed
        Base seed. Index ``e · n_tiles + i`` is tile ``i`` of epoch ``e`` and draws from ``default_rng([seed, e, i])``
        (:class:`EpochSampler` yields these indices).
    augment
        Flips, 90° rotations and HED colour jitter.
    jitter
        Maximum offset of the tile centre from the anchor unit, as a fraction of the tile side.
    max_units_per_tile
        Cap on supervised units per table per tile (a random subset beyond it).
    """

    def __init__(
        self,
        sections: list[Section],
        *,
        model_um_per_px: float,
        tile_size: int,
        output_stride: int,
        n_tiles: int,
        seed: int = 0,
        augment: bool = True,
        jitter: float = 0.25,
        max_units_per_tile: int = 2048,
    ) -> None:
        if tile_size % output_stride:
            msg = f"tile_size ({tile_size}) must be a multiple of output_stride ({output_stride})."
            raise InputError(msg)
        self.sections = sections
        self.sampler = _Sampler(sections)
        self.model_um_per_px = float(model_um_per_px)
        self.tile_size = int(tile_size)
        self.output_stride = int(output_stride)
        self.n_tiles = int(n_tiles)
        self.seed = int(seed)
        self.augment = augment
        self.jitter = float(jitter)
        self.max_units_per_tile = int(max_units_per_tile)

    def __len__(self) -> int:
        return self.n_tiles

    def _extent(self, section: Section) -> float:
        """Side of a tile in the section's full-resolution pixels."""
        return self.tile_size * self.model_um_per_px / section.image_um_per_px

    def __getitem__(self, index: int) -> dict[str, Any]:
        epoch, i = divmod(int(index), self.n_tiles)
        rng = np.random.default_rng([self.seed, epoch, i])
        s, t, u = self.sampler.draw(rng)
        section = self.sections[s]
        jitter = rng.uniform(-self.jitter, self.jitter, size=2) * self._extent(section)
        centre = section.units[t].centers[u] + jitter
        return self._item(section, centre, rng)

    def _item(
        self, section: Section, centre: np.ndarray, rng: np.random.Generator, assigned: list[np.ndarray] | None = None
    ) -> dict[str, Any]:
        """The tile centred at ``centre`` (full-resolution pixels) and the footprints of its supervised units.

        ``assigned`` gives the supervised units per table; ``None``: every allowed unit completely inside.
        """
        extent = self._extent(section)
        tile, origin, scale = read_window(
            section, centre[0] - extent / 2, centre[1] - extent / 2, extent, self.tile_size
        )
        k = int(rng.integers(4)) if self.augment else 0
        flip = bool(rng.integers(2)) if self.augment else False
        out_shape = (self.tile_size // self.output_stride,) * 2
        tables = []
        for t, unit_set in enumerate(section.units):
            idx = self._inside(unit_set, origin, scale) if assigned is None else assigned[t]
            if len(idx) > self.max_units_per_tile:
                idx = np.sort(rng.choice(idx, self.max_units_per_tile, replace=False))
            centers = (unit_set.centers[idx] - origin) * scale
            half = unit_set.half_sizes[idx] * scale
            tables.append((idx, centers, half))
        if self.augment:
            # The same flip and rotation for the image and every table's footprints.
            tables = [
                (idx, *augment_geometry(tile[:, :1, :1], c, h, self.tile_size, k, flip)[1:]) for idx, c, h in tables
            ]
            tile = augment_geometry(tile, np.zeros((0, 2)), np.zeros((0, 2)), self.tile_size, k, flip)[0]
            tile = hed_jitter(tile, rng)
        result: dict[str, Any] = {"image": tile, "tables": []}
        for unit_set, (idx, centers, half) in zip(section.units, tables, strict=True):
            weights = footprint_weights(
                centers / self.output_stride, half / self.output_stride, unit_set.kinds[idx], out_shape
            )
            result["tables"].append((weights, unit_set.targets[idx]))
        return result

    def _inside(self, unit_set: UnitSet, origin: np.ndarray, scale: float) -> np.ndarray:
        """Allowed units whose footprint lies completely inside the tile."""
        if len(unit_set.centers) == 0:
            return np.empty(0, dtype=np.int64)
        half_extent = self.tile_size / scale / 2
        centre = origin + half_extent
        radius = half_extent * np.sqrt(2)
        idx = np.asarray(unit_set.tree().query_ball_point(centre, radius), dtype=np.int64)
        if len(idx) == 0:
            return idx
        idx = np.sort(idx[unit_set.allowed[idx]])
        lo = (unit_set.centers[idx] - unit_set.half_sizes[idx] - origin) * scale
        hi = (unit_set.centers[idx] + unit_set.half_sizes[idx] - origin) * scale
        ok = np.all(lo >= 0, axis=1) & np.all(hi <= self.tile_size, axis=1)
        return idx[ok]


class CoverTileDataset(TileDataset):
    """Fixed, unaugmented tiles that supervise every allowed unit exactly once (for validation).

    Tiles are placed greedily: in row-major order of the units, a tile is centred on the first unit not yet
    assigned, and takes every unassigned allowed unit (of every table) completely inside it. Units larger than a
    tile cannot be supervised and are left out, and a tile with more than ``max_units_per_tile`` units of a table
    (thousands of 2 µm bins) supervises a seeded random subset of them. With ``n_tiles`` smaller than the cover, a
    seeded random subset of the cover's tiles is kept.

    Parameters
    ----------
    sections, model_um_per_px, tile_size, output_stride, max_units_per_tile, seed
        As for :class:`TileDataset`.
    n_tiles
        Most tiles to keep (``None``: the whole cover).
    """

    def __init__(
        self,
        sections: list[Section],
        *,
        model_um_per_px: float,
        tile_size: int,
        output_stride: int,
        n_tiles: int | None = None,
        seed: int = 0,
        max_units_per_tile: int = 2048,
    ) -> None:
        super().__init__(
            sections,
            model_um_per_px=model_um_per_px,
            tile_size=tile_size,
            output_stride=output_stride,
            n_tiles=1,
            seed=seed,
            augment=False,
            jitter=0.0,
            max_units_per_tile=max_units_per_tile,
        )
        cover = [tile for s, section in enumerate(sections) for tile in self._cover(s, section)]
        if n_tiles is not None and len(cover) > n_tiles:
            keep = np.random.default_rng([self.seed, 1]).choice(len(cover), int(n_tiles), replace=False)
            cover = [cover[i] for i in np.sort(keep)]
        self.tiles = cover
        self.n_tiles = len(cover)

    def _cover(self, s: int, section: Section) -> list[tuple[int, np.ndarray, list[np.ndarray]]]:
        extent = self._extent(section)
        free = [unit_set.allowed.copy() for unit_set in section.units]
        order = [
            (t, int(u))
            for t, unit_set in enumerate(section.units)
            for u in np.flatnonzero(unit_set.allowed)[
                np.lexsort((unit_set.centers[unit_set.allowed, 0], unit_set.centers[unit_set.allowed, 1]))
            ]
        ]
        tiles = []
        for t, u in order:
            if not free[t][u]:
                continue
            centre = section.units[t].centers[u].copy()
            origin, scale = window_geometry(
                section, centre[0] - extent / 2, centre[1] - extent / 2, extent, self.tile_size
            )
            assigned = []
            for tt, unit_set in enumerate(section.units):
                idx = self._inside(unit_set, origin, scale)
                idx = idx[free[tt][idx]]
                free[tt][idx] = False
                assigned.append(idx)
            free[t][u] = False  # a unit larger than the tile is never inside one: drop it
            if any(len(a) for a in assigned):
                tiles.append((s, centre, assigned))
        return tiles

    def __len__(self) -> int:
        return self.n_tiles

    def __getitem__(self, index: int) -> dict[str, Any]:
        s, centre, assigned = self.tiles[int(index)]
        return self._item(self.sections[s], centre, np.random.default_rng([self.seed, int(index)]), assigned)


class UnitCropDataset:
    """One crop per unit, centred on it, at the model's resolution (for spot-level baselines).

    Parameters
    ----------
    sections
        From :func:`build_sections`.
    model_um_per_px
        Resolution of the crops.
    crop_size
        Crop side in pixels.
    n_items
        Crops per epoch drawn at random (weighted by units); ``None``: every allowed unit once, in order.
    seed
        Base seed (see :class:`TileDataset`).
    augment
        Flips, 90° rotations (the unit stays centred) and HED colour jitter.
    """

    def __init__(
        self,
        sections: list[Section],
        *,
        model_um_per_px: float,
        crop_size: int,
        n_items: int | None = None,
        seed: int = 0,
        augment: bool = False,
    ) -> None:
        self.sections = sections
        self.sampler = _Sampler(sections)
        self.model_um_per_px = float(model_um_per_px)
        self.crop_size = int(crop_size)
        self.n_items = n_items
        self.seed = int(seed)
        self.augment = augment
        self._all = [
            (s, t, int(u))
            for s, section in enumerate(sections)
            for t, unit_set in enumerate(section.units)
            for u in np.flatnonzero(unit_set.allowed)
        ]

    def __len__(self) -> int:
        return len(self._all) if self.n_items is None else int(self.n_items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        epoch, i = divmod(int(index), len(self))
        rng = np.random.default_rng([self.seed, epoch, i])
        s, t, u = self._all[i] if self.n_items is None else self.sampler.draw(rng)
        section = self.sections[s]
        extent = self.crop_size * self.model_um_per_px / section.image_um_per_px
        centre = section.units[t].centers[u]
        crop, _, _ = read_window(section, centre[0] - extent / 2, centre[1] - extent / 2, extent, self.crop_size)
        if self.augment:
            k, flip = int(rng.integers(4)), bool(rng.integers(2))
            crop, _, _ = augment_geometry(crop, np.zeros((0, 2)), np.zeros((0, 2)), self.crop_size, k, flip)
            crop = hed_jitter(crop, rng)
        return {"image": crop, "table": t, "target": section.units[t].targets[u]}


class EpochSampler:
    """Yields ``epoch · n + i`` for ``i < n``: a dataset draws new tiles each epoch, independent of workers.

    Lightning calls :meth:`set_epoch` before each epoch.
    """

    def __init__(self, n: int) -> None:
        self.n = int(n)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose indices :meth:`__iter__` yields."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Any:
        return iter(range(self.epoch * self.n, (self.epoch + 1) * self.n))
