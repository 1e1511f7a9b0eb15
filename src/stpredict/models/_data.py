"""Training data: measured units from SpatialData tables, tiles read lazily around them, augmentation.

A *section* is one slide: its H&E image (read lazily, level by level, from dask) and one or more tables of
measured units (spots or bins of several sizes). Each table's units are kept as footprints in the image's
full-resolution pixel space: centre ``(x, y)``, half sizes, and a kind (disk or axis-aligned rectangle).

Tiles are ``tile_size`` pixels at the model's µm per pixel. A tile is placed around a random unit (plus jitter), its
window read from the finest pyramid level that is not coarser than the model's resolution, and resampled to the
model's resolution (the geometry of the resampling is exact: footprints are mapped with the scale actually used).
Only units whose footprint lies completely inside the tile are supervised. Flips and 90° rotations are applied to
the image and the footprints together; colour augmentation perturbs the haematoxylin/eosin/DAB stain space.
Every random draw comes from ``numpy.random.default_rng([seed, epoch, index])``, so a tile does not depend on which
worker draws it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from scipy import sparse

from stpredict._errors import InputError
from stpredict._geometry import affine_between, apply_affine, scale_levels, um_per_px
from stpredict._validation import check_raw_counts

from ._footprints import DISK, RECT, footprint_weights

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch
    from anndata import AnnData
    from spatialdata import SpatialData

__all__ = [
    "CoverTileDataset",
    "EpochSampler",
    "Section",
    "TileDataset",
    "UnitCropDataset",
    "UnitSet",
    "build_sections",
    "collate_tiles",
    "collate_units",
    "hed_jitter",
    "log1p_cpm",
    "read_window",
    "sparse_weights",
]

_BACKGROUND = 255  # padding value outside the slide: white glass


@dataclass
class UnitSet:
    """The measured units of one table on one section, in the image's full-resolution pixel space."""

    name: str
    centers: np.ndarray  # (n, 2) float64, x, y
    half_sizes: np.ndarray  # (n, 2) float64
    kinds: np.ndarray  # (n,) int8, DISK or RECT
    targets: np.ndarray  # (n, genes) float32
    allowed: np.ndarray  # (n,) bool: units this dataset may sample and supervise
    _tree: Any = field(default=None, repr=False)

    @property
    def extent(self) -> np.ndarray:
        """Half diagonal of each unit's bounding box (for the neighbour query)."""
        return np.hypot(self.half_sizes[:, 0], self.half_sizes[:, 1])

    def tree(self) -> Any:
        """KD-tree over unit centres (built once)."""
        if self._tree is None:
            from scipy.spatial import cKDTree

            self._tree = cKDTree(self.centers)
        return self._tree

    def subset(self, allowed: np.ndarray) -> UnitSet:
        """The same units with a different ``allowed`` mask (shares arrays and tree)."""
        out = UnitSet(self.name, self.centers, self.half_sizes, self.kinds, self.targets, allowed)
        out._tree = self._tree
        return out


@dataclass
class Section:
    """One slide: lazily read image levels and the unit sets of its tables."""

    levels: list[Any]  # DataArrays (c, y, x), finest first
    level_factors: list[float]  # full-resolution pixels per level pixel
    image_um_per_px: float
    units: list[UnitSet]

    def subset(self, masks: list[np.ndarray]) -> Section:
        """The same section with per-table ``allowed`` masks."""
        return Section(
            self.levels,
            self.level_factors,
            self.image_um_per_px,
            [u.subset(m) for u, m in zip(self.units, masks, strict=True)],
        )


# --- targets -------------------------------------------------------------------------------------------------------


def log1p_cpm(counts: Any, *, target_sum: float = 1e4, columns: np.ndarray | None = None) -> np.ndarray:
    """``log1p(counts / total · target_sum)`` per unit, totals over all genes (TRIPLEX / PixNet targets).

    Same values as :func:`stpredict.pp.normalize` with ``method="log1p_cpm"`` (no smoothing); only ``columns``
    (default: all) are densified, so a sparse table with many genes stays cheap.
    """
    from stpredict.pp._normalize import scaled_log1p

    return scaled_log1p(counts, target_sum, columns=columns).astype(np.float32)


def _dense_rows(matrix: Any, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    sub = matrix[rows][:, cols]
    return np.asarray(sub.toarray() if sparse.issparse(sub) else sub, dtype=np.float32)


def _table_targets(
    table: AnnData,
    rows: np.ndarray,
    genes: Sequence[str],
    space: Literal["normalised", "counts"],
    key: str,
    target_layer: str | None,
) -> np.ndarray:
    missing = [g for g in genes if g not in table.var_names]
    if missing:
        msg = (
            f"Table {key!r} lacks {len(missing)} of the model's genes (e.g. {missing[:5]}). Train on genes every "
            "table has, e.g. `genes=` from `st.pp.select_genes`, or subset the model's gene list."
        )
        raise InputError(msg)
    cols = table.var_names.get_indexer(list(genes))
    if space == "normalised" and target_layer is not None:
        if target_layer not in table.layers:
            msg = (
                f"Table {key!r} has no layer {target_layer!r} (layers: {sorted(table.layers)}). Write it with "
                f"`st.pp.normalize(table, key_added={target_layer!r})`, or leave target_layer=None to use "
                "log1p CPM of the raw counts in X."
            )
            raise InputError(msg)
        return _dense_rows(table.layers[target_layer], rows, cols)
    hint = "" if space == "counts" else " (or pass target_layer= naming a layer of normalised values)"
    check_raw_counts(table.X, name=f"counts in X of table {key!r}{hint}")
    if space == "normalised":
        return log1p_cpm(table.X[rows], columns=cols)
    return _dense_rows(table.X, rows, cols)


# --- geometry ------------------------------------------------------------------------------------------------------


def _region_of(table: AnnData, key: str, shapes_key: str | None) -> tuple[str, str, str]:
    attrs = table.uns.get("spatialdata_attrs", {})
    region, region_key, instance_key = attrs.get("region"), attrs.get("region_key"), attrs.get("instance_key")
    if region is None or region_key is None or instance_key is None:
        msg = (
            f"Table {key!r} does not say which shapes it annotates. Parse it with "
            "`spatialdata.models.TableModel.parse(adata, region=..., region_key='region', instance_key='instance_id')`."
        )
        raise InputError(msg)
    regions = [region] if isinstance(region, str) else list(region)
    if shapes_key is None:
        if len(regions) != 1:
            msg = f"Table {key!r} annotates several elements {regions}; choose one with `shapes_key=`."
            raise InputError(msg)
        shapes_key = regions[0]
    elif shapes_key not in regions:
        msg = f"Table {key!r} annotates {regions}, not {shapes_key!r}; pass one of those as `shapes_key=`."
        raise InputError(msg)
    return shapes_key, region_key, instance_key


def _unit_geometry(sdata: SpatialData, shapes_key: str, image_key: str, index: Any) -> tuple[np.ndarray, ...]:
    """Centres, half sizes and kinds of the shapes rows ``index``, in the image's pixel space."""
    if shapes_key not in sdata.shapes:
        msg = f"Shapes element {shapes_key!r} not found; available: {sorted(sdata.shapes)}."
        raise KeyError(msg)
    gdf = sdata.shapes[shapes_key].loc[index]
    affine = affine_between(sdata, shapes_key, image_key)
    linear = affine[:2, :2]
    if abs(linear[0, 1]) > 1e-9 * np.abs(linear).max() or abs(linear[1, 0]) > 1e-9 * np.abs(linear).max():
        rotated = True
    else:
        rotated = False
    geom_type = gdf.geometry.geom_type.iloc[0] if len(gdf) else "Point"
    if geom_type == "Point":
        if "radius" not in gdf.columns:
            msg = f"Shapes {shapes_key!r} are points without a 'radius' column; measured units need an area."
            raise InputError(msg)
        xy = np.column_stack([gdf.geometry.x.to_numpy(), gdf.geometry.y.to_numpy()])
        centers = apply_affine(affine, xy)
        r = gdf["radius"].to_numpy(dtype=np.float64) * np.sqrt(abs(np.linalg.det(linear)))
        return centers, np.column_stack([r, r]), np.full(len(gdf), DISK, dtype=np.int8)
    if rotated:
        msg = (
            f"Shapes {shapes_key!r} are polygons in a frame rotated relative to {image_key!r}; only axis-aligned "
            "square bins are supported as training footprints."
        )
        raise InputError(msg)
    bounds = gdf.geometry.bounds.to_numpy(dtype=np.float64)  # minx, miny, maxx, maxy
    lo = apply_affine(affine, bounds[:, :2])
    hi = apply_affine(affine, bounds[:, 2:])
    lo, hi = np.minimum(lo, hi), np.maximum(lo, hi)
    return (lo + hi) / 2, (hi - lo) / 2, np.full(len(gdf), RECT, dtype=np.int8)


def _image_levels(sdata: SpatialData, image_key: str) -> tuple[list[Any], list[float]]:
    if image_key not in sdata.images:
        msg = f"Image {image_key!r} not found; available images: {sorted(sdata.images)}."
        raise KeyError(msg)
    levels = scale_levels(sdata.images[image_key])
    nx0 = levels[0].sizes["x"]
    factors = [nx0 / lev.sizes["x"] for lev in levels]
    if levels[0].sizes["c"] != 3:
        msg = f"Image {image_key!r} has {levels[0].sizes['c']} channels; an RGB H&E image (c = r, g, b) is needed."
        raise InputError(msg)
    return levels, factors


def build_sections(
    data: SpatialData | Sequence[SpatialData],
    *,
    image_key: str,
    table_keys: Sequence[str],
    shapes_key: str | None,
    genes: Sequence[str],
    space: Literal["normalised", "counts"],
    target_layer: str | None = None,
) -> list[Section]:
    """Collect units, footprints and targets of every section (nothing is read from the images yet).

    Parameters
    ----------
    data
        One SpatialData or a list of them (one per section).
    image_key
        H&E image key (calibrated: its µm per pixel must be known).
    table_keys
        Tables of measured units (several bin sizes train together).
    shapes_key
        Shapes element the tables annotate, when a table annotates several.
    genes
        Target genes, in model order.
    space
        ``"normalised"`` (``target_layer``, or log1p CPM of the raw counts in ``X`` over all of a table's genes)
        or ``"counts"`` (raw counts in ``X``).
    target_layer
        Layer of normalised targets (e.g. ``"log1p_cpm"`` written by :func:`stpredict.pp.normalize`).
    """
    sdatas = [data] if not isinstance(data, list | tuple) else list(data)
    if not sdatas:
        msg = "No training data: pass a SpatialData or a non-empty list of them."
        raise InputError(msg)
    sections = []
    for sdata in sdatas:
        levels, factors = _image_levels(sdata, image_key)
        image_um = um_per_px(sdata, image_key)
        units = []
        for key in table_keys:
            if key not in sdata.tables:
                msg = f"Table {key!r} not found; available tables: {sorted(sdata.tables)}."
                raise KeyError(msg)
            table = sdata.tables[key]
            skey, region_key, instance_key = _region_of(table, key, shapes_key)
            rows = np.flatnonzero(table.obs[region_key].astype(str).to_numpy() == skey)
            index = table.obs[instance_key].to_numpy()[rows]
            centers, half, kinds = _unit_geometry(sdata, skey, image_key, index)
            targets = _table_targets(table, rows, genes, space, key, target_layer)
            units.append(UnitSet(key, centers, half, kinds, targets, np.ones(len(rows), dtype=bool)))
        sections.append(Section(levels, factors, image_um, units))
    return sections


def split_by_position(sections: list[Section], fraction: float) -> tuple[list[Section], list[Section]]:
    """Hold out the right-most ``fraction`` of each section (by unit x), a contiguous block, for validation."""
    train, val = [], []
    for section in sections:
        xs = np.concatenate([u.centers[:, 0] for u in section.units])
        cut = np.quantile(xs, 1.0 - fraction)
        train.append(section.subset([u.centers[:, 0] < cut for u in section.units]))
        val.append(section.subset([u.centers[:, 0] >= cut for u in section.units]))
    return train, val


# --- image reading and augmentation --------------------------------------------------------------------------------


def _window_on_level(section: Section, x0: float, y0: float, extent: float, size: int) -> tuple[int, int, int, int]:
    """Pyramid level, first column and row on it, and side in its pixels of the window :func:`read_window` reads."""
    ratio = extent / size  # full-resolution pixels per tile pixel
    level = max((k for k, f in enumerate(section.level_factors) if f <= ratio * (1 + 1e-6)), default=0)
    f = section.level_factors[level]
    return level, int(np.floor(x0 / f)), int(np.floor(y0 / f)), max(int(np.ceil(extent / f)), 1)


def window_geometry(section: Section, x0: float, y0: float, extent: float, size: int) -> tuple[np.ndarray, float]:
    """The ``(origin, scale)`` that :func:`read_window` returns for this window, without reading it."""
    level, lx0, ly0, n = _window_on_level(section, x0, y0, extent, size)
    f = section.level_factors[level]
    return np.array([lx0 * f, ly0 * f]), size / (n * f)


def read_window(
    section: Section, x0: float, y0: float, extent: float, size: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """Read a square window of ``extent`` full-resolution pixels at ``(x0, y0)``, resampled to ``size`` pixels.

    Returns the ``uint8 (3, size, size)`` tile and the exact ``(origin, scale)`` used: a full-resolution point ``p``
    lands at tile pixel coordinate ``(p − origin) · scale`` (same for x and y).
    """
    import torch

    level, lx0, ly0, n = _window_on_level(section, x0, y0, extent, size)
    f = section.level_factors[level]
    array = section.levels[level]
    ny, nx = array.sizes["y"], array.sizes["x"]
    out = np.full((3, n, n), _BACKGROUND, dtype=np.uint8)
    ys, ye = max(ly0, 0), min(ly0 + n, ny)
    xs, xe = max(lx0, 0), min(lx0 + n, nx)
    if ye > ys and xe > xs:
        window = array.data[:, ys:ye, xs:xe]
        if hasattr(window, "compute"):
            # In this thread: DataLoader workers are forked, and a forked child has no threads of the parent's
            # dask pool to wait on (the threaded scheduler hangs there forever).
            window = window.compute(scheduler="synchronous")
        window = np.asarray(window)
        out[:, ys - ly0 : ye - ly0, xs - lx0 : xe - lx0] = window.astype(np.uint8, copy=False)
    if n != size:
        t = torch.from_numpy(out).float()[None]
        t = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", antialias=n > size)
        out = t[0].round().clamp(0, 255).to(torch.uint8).numpy()
    return out, np.array([lx0 * f, ly0 * f]), size / (n * f)


_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)
_LOG_ADJUST = np.log(1e-6)


def hed_jitter(tile: np.ndarray, rng: np.random.Generator, *, sigma: float = 0.05, bias: float = 0.01) -> np.ndarray:
    """Perturb stain concentrations: ``hed · U(1 ± sigma) + U(± bias)`` per channel (Tellez et al. 2018).

    Same colour deconvolution as :func:`skimage.color.rgb2hed` (Ruifrok & Johnston stain vectors).
    ``tile`` is ``uint8 (3, h, w)``; returns a new ``uint8`` tile.
    """
    rgb = np.maximum(tile.astype(np.float64) / 255.0, 1e-6)
    # Unclipped (unlike skimage), so that the transform is exactly invertible for colours outside the stain gamut.
    hed = (np.log(rgb) / _LOG_ADJUST).transpose(1, 2, 0) @ _HED_FROM_RGB
    alpha = rng.uniform(1 - sigma, 1 + sigma, size=3)
    beta = rng.uniform(-bias, bias, size=3)
    hed = hed * alpha + beta
    out = np.exp((hed * _LOG_ADJUST) @ _RGB_FROM_HED)
    return np.clip(np.round(out * 255.0), 0, 255).astype(np.uint8).transpose(2, 0, 1)


def augment_geometry(
    tile: np.ndarray, centers: np.ndarray, half_sizes: np.ndarray, size: float, k: int, flip: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flip (left-right) then rotate by ``k`` × 90° (``np.rot90`` sense) an image and its footprints together.

    ``centers`` are ``(x, y)`` in tile pixel coordinates on ``[0, size]``.
    """
    centers = centers.copy()
    half_sizes = half_sizes.copy()
    if flip:
        tile = tile[:, :, ::-1]
        centers[:, 0] = size - centers[:, 0]
    for _ in range(k % 4):
        # np.rot90 on (y, x): new[i, j] = old[j, n-1-i]  →  x' = y, y' = size − x.
        tile = np.rot90(tile, 1, axes=(1, 2))
        centers = np.column_stack([centers[:, 1], size - centers[:, 0]])
        half_sizes = half_sizes[:, ::-1]
    return np.ascontiguousarray(tile), centers, half_sizes


# --- datasets -------------------------------------------------------------------------------------------------------


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


def collate_tiles(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tiles; per table, the block-diagonal weights over the whole batch (COO parts) and the targets.

    Each table's entry is ``None`` when no tile of the batch holds a complete unit of it, else a dict with
    ``indices (2, nnz)``, ``values (nnz,)``, ``shape (2,)`` and ``targets (units, genes)``; :func:`sparse_weights`
    turns the first three into the sparse matrix.
    """
    import torch

    images = torch.from_numpy(np.stack([it["image"] for it in items]))
    n_pix = items[0]["tables"][0][0].shape[1] if items[0]["tables"] else 0
    tables = []
    for t in range(len(items[0]["tables"])):
        blocks = [it["tables"][t][0] for it in items]
        stacked = sparse.block_diag(blocks, format="coo") if blocks else None
        targets = np.concatenate([it["tables"][t][1] for it in items], axis=0)
        if stacked is None or stacked.shape[0] == 0:
            tables.append(None)
            continue
        # Plain tensors (not a torch sparse tensor) cross worker processes and devices safely; see sparse_weights.
        indices = torch.from_numpy(np.vstack([stacked.row, stacked.col]).astype(np.int64))
        values = torch.from_numpy(stacked.data.astype(np.float32))
        shape = torch.tensor([stacked.shape[0], len(items) * n_pix], dtype=torch.long)
        targets_t = torch.from_numpy(np.ascontiguousarray(targets, dtype=np.float32))
        tables.append({"indices": indices, "values": values, "shape": shape, "targets": targets_t})
    return {"image": images, "tables": tables}


def sparse_weights(entry: dict[str, torch.Tensor]) -> torch.Tensor:
    """The sparse COO weight matrix ``(units, batch·h·w)`` of one table of a collated batch, on its device."""
    import torch

    size = tuple(int(v) for v in entry["shape"])
    return torch.sparse_coo_tensor(
        entry["indices"], entry["values"], size, device=entry["values"].device, check_invariants=False
    ).coalesce()


def collate_units(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack unit crops, their table index and targets."""
    import torch

    return {
        "image": torch.from_numpy(np.stack([it["image"] for it in items])),
        "table": torch.tensor([it["table"] for it in items], dtype=torch.long),
        "target": torch.from_numpy(np.stack([it["target"] for it in items]).astype(np.float32)),
    }
