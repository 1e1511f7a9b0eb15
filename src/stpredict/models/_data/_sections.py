"""Sections and their measured units: footprints and targets collected from SpatialData tables.

A *section* is one slide: its H&E image (read lazily, level by level, from dask) and one or more tables of
measured units (spots or bins of several sizes). Each table's units are kept as footprints in the image's
full-resolution pixel space: centre ``(x, y)``, half sizes, and a kind (disk or axis-aligned rectangle), with one
target vector per unit (log1p CPM, a layer of normalised values, or raw counts). Nothing is read from the images here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from scipy import sparse

from stpredict._errors import InputError
from stpredict._geometry import affine_between, apply_affine, scale_levels, um_per_px
from stpredict._validation import check_raw_counts
from stpredict.models._footprints import DISK, RECT
from stpredict.pp._normalize import scaled_log1p

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anndata import AnnData
    from spatialdata import SpatialData

__all__ = ["Section", "UnitSet", "build_sections", "log1p_cpm", "split_by_position"]


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
