"""The map that ``aggregate`` reads, checked once, and how its raw pixel-overlap sums become values.

:func:`_check_map` validates the image (named, unique channels; the genes asked for; its declared value kind
against ``reduce``; its µm scale where needed) and returns a :class:`_Map` with the full-resolution level as a
:class:`~stpredict.tl._raster._Raster`. :func:`_unit_scale` and :func:`_finish` turn the sums into the mean or the
sum that the map's reduction asks for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from stpredict._errors import InputError
from stpredict._geometry import is_calibrated, scale_levels, to_um_affine
from stpredict._keys import Attrs
from stpredict._meta import get_element_meta

from ._raster import _Raster

if TYPE_CHECKING:
    from spatialdata import SpatialData

__all__ = ["_Map", "_axis_aligned", "_check_map", "_finish", "_unit_scale"]

_AXIS_TOL = 1e-9


@dataclass
class _Map:
    key: str
    data: _Raster  # the full-resolution level, selected channels
    channels: list[str]
    channel_index: np.ndarray
    px_area_um2: float | None
    to_um: np.ndarray | None
    value_kind: str | None
    reduce: str


def _axis_aligned(m: np.ndarray) -> bool:
    scale = max(abs(m[0, 0]), abs(m[1, 1]), 1e-300)
    return abs(m[0, 1]) <= _AXIS_TOL * scale and abs(m[1, 0]) <= _AXIS_TOL * scale and m[0, 0] > 0 and m[1, 1] > 0


def _check_map(sdata: SpatialData, image_key: str, genes: Any, reduce: str | None, force: bool, need_um: bool) -> _Map:
    if image_key not in sdata.images:
        msg = f"No image {image_key!r} in the SpatialData; available images: {sorted(sdata.images)}."
        raise KeyError(msg)
    element = sdata.images[image_key]
    level = scale_levels(element)[0]
    names = [str(c) for c in level.coords["c"].values] if "c" in level.coords else []
    if not names or not all(isinstance(c, str) for c in level.coords["c"].values.tolist()):
        msg = (
            f"The channels of {image_key!r} have no names (c = {names}); aggregate writes them as var_names. "
            "Parse the image with `Image2DModel.parse(..., c_coords=[gene names])`."
        )
        raise InputError(msg)
    if len(set(names)) != len(names):
        msg = f"The channel names of {image_key!r} are not unique; rename the duplicated channels."
        raise InputError(msg)
    if genes is None:
        index = np.arange(len(names))
    else:
        genes = [genes] if isinstance(genes, str) else list(genes)
        missing = [g for g in genes if g not in names]
        if missing or not genes:
            msg = f"Genes {missing[:10]} are not channels of {image_key!r} (it has {len(names)}, e.g. {names[:5]})."
            raise KeyError(msg) if missing else InputError("`genes` is empty; pass None for all channels.")
        position = {n: i for i, n in enumerate(names)}
        index = np.array([position[g] for g in genes])
    meta = get_element_meta(sdata, image_key, element)
    kind = meta.get(Attrs.value_kind)
    default = {Attrs.density: "sum", Attrs.intensive: "mean"}.get(kind)
    if reduce is None:
        if default is None:
            msg = (
                f"The value kind of {image_key!r} is not declared ('density' or 'intensive'), so the reduction "
                "is ambiguous: pass reduce='mean' (area-weighted mean) or reduce='sum' (pixel sum)."
            )
            raise InputError(msg)
        reduce = default
    if reduce not in ("sum", "mean"):
        msg = f"reduce must be 'sum' or 'mean', got {reduce!r}."
        raise InputError(msg)
    if default is not None and reduce != default and not force:
        msg = (
            f"{image_key!r} is declared {kind!r}, which aggregates by {default!r}; reduce={reduce!r} would mix "
            f"units of different size. Use reduce={default!r}, or pass force=True if you mean it."
        )
        raise InputError(msg)
    to_um = None
    px_area = None
    if need_um or kind == Attrs.density or is_calibrated(sdata, image_key):  # area_um2 whenever it is known
        to_um = to_um_affine(sdata, image_key)
        px_area = float(abs(np.linalg.det(to_um[:2, :2])))
    raster = _Raster.of(level.data, None if genes is None else index)
    return _Map(image_key, raster, [names[i] for i in index], index, px_area, to_um, kind, reduce)


def _unit_scale(n_px: np.ndarray, m: _Map) -> tuple[np.ndarray, str]:
    """Factor per unit from the raw pixel-overlap sum to the value, and the unit of ``"sum"``.

    ``"mean"`` divides by the unit's pixel count; ``"sum"`` of a density map multiplies by the pixel area (µm²), of
    any other map keeps pixel sums.
    """
    n_px = np.asarray(n_px, dtype=np.float64)
    if m.reduce == "mean":
        with np.errstate(invalid="ignore", divide="ignore"):
            return 1.0 / n_px, "mean"
    if m.value_kind == Attrs.density:
        return np.full(n_px.size, float(m.px_area_um2)), "um2"
    return np.ones(n_px.size), "px"


def _finish(sums: np.ndarray, obs: dict[str, np.ndarray], m: _Map) -> tuple[np.ndarray, str]:
    """Float32 values from float64 raw pixel-overlap sums (scaled in place), and the unit of ``"sum"``."""
    scale, sum_unit = _unit_scale(obs["n_pixels"], m)
    sums *= scale[:, None]
    return sums.astype(np.float32), sum_unit
