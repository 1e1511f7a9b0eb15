"""The square bin grid in µm: where bins of a given size sit over an image, their instance ids and their shapes.

A :class:`Grid` is a bin size and an origin in the ``"um"`` coordinate system; bin ``(row, col)`` has instance id
``row * ID_STRIDE + col``. :func:`grid_from_args` checks the grid arguments (also the origin of an existing grid to
align to), :func:`bins_geodataframe` builds the bins' square polygons and :func:`grid_transformations` places them
like a reference element. Used by ``tl.aggregate`` (maps into bins) and ``pp.bin_counts`` (units into bins).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from stpredict._errors import InputError
from stpredict._geometry import apply_affine, get_element, to_um_affine, transformation_matrix
from stpredict._settings import settings

if TYPE_CHECKING:
    import geopandas as gpd
    from spatialdata import SpatialData

__all__ = ["ID_STRIDE", "Grid", "bins_geodataframe", "grid_from_args", "grid_transformations"]

#: Instance id of bin (r, k) is ``r * ID_STRIDE + k``.
ID_STRIDE = 10**7


@dataclass(frozen=True)
class Grid:
    """A square grid in µm: bin size and the origin reduced into ``(-size, 0]``."""

    size: float
    x0: float
    y0: float

    @classmethod
    def make(cls, size: float, origin: tuple[float, float] = (0.0, 0.0)) -> Grid:
        """Grid of ``size`` µm through ``origin`` (µm); the origin is reduced modulo ``size``."""
        size = float(size)

        def reduce(o: float) -> float:
            q = o / size
            if abs(q - round(q)) < 1e-9:  # on the lattice up to float noise
                return 0.0
            return o - math.ceil(q) * size

        return cls(size, reduce(float(origin[0])), reduce(float(origin[1])))

    def index_range(self, lo: float, hi: float, axis: str) -> tuple[int, int]:
        """Bin indices ``[k0, k1)`` along ``axis`` ("x"/"y") that meet the µm interval ``[lo, hi)``."""
        o = self.x0 if axis == "x" else self.y0
        return max(0, math.floor((lo - o) / self.size + 1e-9)), max(0, math.ceil((hi - o) / self.size - 1e-9))

    def edges(self, k0: int, k1: int, axis: str) -> np.ndarray:
        """µm edges of bins ``k0 … k1-1`` (``k1 - k0 + 1`` values)."""
        o = self.x0 if axis == "x" else self.y0
        return o + self.size * np.arange(k0, k1 + 1, dtype=np.float64)

    def assign(self, x_um: np.ndarray, y_um: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(array_row, array_col)`` of the bins holding points at ``(x_um, y_um)`` (a point on an edge goes up)."""
        col = np.floor((np.asarray(x_um) - self.x0) / self.size).astype(np.int64)
        row = np.floor((np.asarray(y_um) - self.y0) / self.size).astype(np.int64)
        return row, col

    def ids(self, row: np.ndarray, col: np.ndarray) -> np.ndarray:
        """Instance ids of bins; raises where an index falls outside ``[0, ID_STRIDE)``."""
        row, col = np.asarray(row, dtype=np.int64), np.asarray(col, dtype=np.int64)
        if row.size and (row.min() < 0 or col.min() < 0 or col.max() >= ID_STRIDE or row.max() >= ID_STRIDE):
            msg = (
                "Some units lie at negative µm coordinates (before the grid origin) or more than "
                f"{ID_STRIDE} bins away; bins are numbered from the image corner. Check the transformations."
            )
            raise InputError(msg)
        return row * ID_STRIDE + col

    def params(self) -> dict[str, Any]:
        """JSON-serialisable description, stored in ``uns``."""
        return {"bin_size_um": self.size, "origin_um": [self.x0, self.y0], "id_stride": ID_STRIDE}


def _grid_origin_from_shapes(sdata: SpatialData, key: str) -> tuple[float, float]:
    """Origin (µm) of an existing axis-aligned grid of square bins or circles stored as shapes ``key``."""
    import shapely

    shapes = sdata.shapes[key]
    if len(shapes) == 0:
        msg = f"Shapes {key!r} are empty; `align_to` needs an existing grid of bins."
        raise InputError(msg)
    to_um = to_um_affine(sdata, key)
    geoms = shapes.geometry.to_numpy()
    if "radius" in shapes.columns and (shapes.geometry.geom_type == "Point").all():
        um = apply_affine(to_um, shapely.get_coordinates(geoms))
        xs = np.unique(np.round(um[:, 0], 6))
        pitch = float(np.median(np.diff(xs))) if xs.size > 1 else None
    else:
        # bounding-box centres: the centroids of square bins (also rotated ones), without shapely's centroid pass
        # (1.3 s for 2.25 million boxes)
        b = shapely.bounds(geoms)
        lo, hi = apply_affine(to_um, b[:, :2]), apply_affine(to_um, b[:, 2:])
        um = (lo + hi) / 2
        pitch = float(np.median(np.abs(hi[:, 0] - lo[:, 0])))
    if not pitch or pitch <= 0:
        msg = f"Cannot find the pitch of the grid {key!r}; pass `origin_um=(x0, y0)` instead of `align_to`."
        raise InputError(msg)
    fx = (um[:, 0] / pitch) - np.round(um[:, 0] / pitch)
    fy = (um[:, 1] / pitch) - np.round(um[:, 1] / pitch)
    # the centres sit on a lattice offset by a common fraction of the pitch when the grid is axis-aligned
    dx = fx - np.median(fx)
    dy = fy - np.median(fy)
    dx, dy = (d - np.round(d) for d in (dx, dy))
    if np.abs(dx).max() > 0.01 or np.abs(dy).max() > 0.01:
        msg = (
            f"The units of {key!r} are not on an axis-aligned square lattice in µm (for example a Visium HD grid "
            "registered with a rotation), so square bins cannot match them one to one. Aggregate onto their "
            f"shapes with `shapes_key={key!r}` instead, or pass `origin_um`."
        )
        raise InputError(msg)
    i = int(np.argmin(um[:, 0] + um[:, 1]))
    return float(um[i, 0] - pitch / 2), float(um[i, 1] - pitch / 2)


def grid_from_args(
    sdata: SpatialData,
    bin_size: float,
    origin_um: tuple[float, float] | None,
    align_to: str | None,
) -> Grid:
    """Validate the grid arguments and build the :class:`Grid`."""
    if isinstance(bin_size, bool) or not isinstance(bin_size, int | float | np.number) or not np.isfinite(bin_size):
        msg = f"bin_size must be a positive number of µm, got {bin_size!r}."
        raise InputError(msg)
    if bin_size <= 0:
        msg = f"bin_size must be positive (µm), got {bin_size!r}."
        raise InputError(msg)
    if origin_um is not None and align_to is not None:
        msg = "Pass either `origin_um` or `align_to`, not both."
        raise InputError(msg)
    if align_to is not None:
        if align_to not in sdata.shapes:
            msg = f"No shapes {align_to!r} to align the grid to; available shapes: {sorted(sdata.shapes)}."
            raise KeyError(msg)
        origin_um = _grid_origin_from_shapes(sdata, align_to)
    if origin_um is not None:
        origin = tuple(float(v) for v in origin_um)
        if len(origin) != 2 or not all(np.isfinite(origin)):
            msg = f"origin_um must be two finite numbers (x, y) in µm, got {origin_um!r}."
            raise InputError(msg)
    else:
        origin = (0.0, 0.0)
    return Grid.make(float(bin_size), origin)


def bins_geodataframe(grid: Grid, row: np.ndarray, col: np.ndarray, ids: np.ndarray) -> gpd.GeoDataFrame:
    """Square polygons of the bins in µm, indexed by instance id (built vectorised with ``shapely.box``)."""
    import geopandas as gpd
    import shapely

    x0 = grid.x0 + grid.size * np.asarray(col, dtype=np.float64)
    y0 = grid.y0 + grid.size * np.asarray(row, dtype=np.float64)
    geometry = shapely.box(x0, y0, x0 + grid.size, y0 + grid.size)
    return gpd.GeoDataFrame(geometry=geometry, index=np.asarray(ids))


def grid_transformations(sdata: SpatialData, reference_key: str) -> dict[str, Any]:
    """Transformations for an element in µm intrinsic coordinates placed like ``reference_key``.

    ``"um"`` gets the identity; every other coordinate system of the reference gets its transformation composed
    with the inverse of the reference's µm affine.
    """
    from spatialdata.transformations import Affine, Identity, get_transformation

    to_um = to_um_affine(sdata, reference_key)
    out: dict[str, Any] = {settings.um_coordinate_system: Identity()}
    for cs, t in get_transformation(get_element(sdata, reference_key), get_all=True).items():
        if cs == settings.um_coordinate_system:
            continue
        out[cs] = Affine(transformation_matrix(t) @ np.linalg.inv(to_um), input_axes=("x", "y"), output_axes=("x", "y"))
    return out
