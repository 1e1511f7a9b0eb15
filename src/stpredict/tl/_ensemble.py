"""Ensembles of dense maps: the mean map and the standard-deviation map of several models' maps of one slide."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from stpredict._elements import add_elements, check_new_elements
from stpredict._errors import InputError
from stpredict._geometry import scale_levels
from stpredict._logging import get_logger
from stpredict._meta import get_element_meta, set_element_meta

if TYPE_CHECKING:
    from collections.abc import Sequence

    from spatialdata import SpatialData
    from xarray import DataArray, DataTree

__all__ = ["ensemble_maps"]

logger = get_logger(__name__)

#: Suffix of the standard-deviation map written beside the mean map.
SD_SUFFIX = "_sd"


def ensemble_maps(
    sdata: SpatialData,
    *,
    map_keys: Sequence[str],
    key_added: str | None = None,
    ddof: int = 1,
    inplace: bool = True,
    overwrite: bool = False,
) -> tuple[DataTree | DataArray, DataTree | DataArray] | None:
    """The mean and the standard deviation, pixel by pixel, of several dense maps of one slide.

    An ensemble of models (several seeds, or the models of cross-validation folds), each predicted over the same
    image with :func:`stpredict.tl.predict_dense`, gives a mean map (usually more accurate than any member) and a
    standard-deviation map that says where the members disagree. Both are written as image layers beside each other,
    ``key_added`` and ``key_added + "_sd"``, with the members' genes as channels, the same pyramid and coordinate
    systems, and the members' metadata (plus the list of members), so :func:`stpredict.tl.aggregate`,
    :func:`stpredict.pl.gene_map` and :func:`stpredict.tl.evaluate_uncertainty` take them like any map. Both are
    computed lazily, chunk by chunk (dask), so whole slides stay within bounded memory; a backed SpatialData keeps
    them in memory until ``sdata.write_element``.

    Aggregating the sd map into units gives the sum (density maps) or mean (intensive maps) of the pixels'
    standard deviations, an upper bound on the standard deviation of the unit's value over the members (the
    members' errors inside a unit are positively correlated, so it is close to it, but it is not the same).

    Parameters
    ----------
    sdata
        The SpatialData holding the members' maps.
    map_keys
        Keys of at least two dense maps in ``sdata.images``, predicted over the same image (same genes in the same
        order, same shape, transformations and ``value_kind``).
    key_added
        Key of the mean map; the standard deviation goes to ``key_added + "_sd"``. Default: the image key the
        maps were predicted from, plus ``"_ensemble"``.
    ddof
        Delta degrees of freedom of the standard deviation: 1 (default) is the sample standard deviation over the
        members, 0 the population one.
    inplace
        Write both maps into ``sdata``; otherwise return them and write nothing.
    overwrite
        Replace existing elements ``key_added`` and ``key_added + "_sd"``.

    Returns
    -------
    ``None`` when ``inplace``; otherwise the mean and standard-deviation image elements.

    Raises
    ------
    InputError
        Fewer than two maps, a key that is not an image (the message lists them), maps that differ in genes, shape,
        transformations or ``value_kind``, ``ddof`` not below the number of maps, or an existing key without
        ``overwrite``.

    Examples
    --------
    >>> for seed in range(3):  # doctest: +SKIP
    ...     model = st.models.PixNet(genes, seed=seed).fit(train)
    ...     st.tl.predict_dense(sdata, model, key_added=f"he_pixnet_{seed}")
    >>> members = [f"he_pixnet_{s}" for s in range(3)]  # doctest: +SKIP
    >>> st.tl.ensemble_maps(sdata, map_keys=members, key_added="he_pixnet")  # doctest: +SKIP
    >>> sorted(k for k in sdata.images if k.startswith("he_pixnet"))[:2]  # doctest: +SKIP
    ['he_pixnet', 'he_pixnet_0']
    >>> st.tl.aggregate(sdata, "he_pixnet_sd", shapes_key="spots", key_added="spots_sd")  # doctest: +SKIP
    """
    keys = [str(k) for k in map_keys]
    if len(keys) < 2 or len(set(keys)) != len(keys):
        msg = f"An ensemble needs at least two different maps; got map_keys={keys}."
        raise InputError(msg)
    missing = [k for k in keys if k not in sdata.images]
    if missing:
        msg = f"No images {missing} in the SpatialData; available images: {sorted(sdata.images)}."
        raise InputError(msg)
    if not 0 <= ddof < len(keys):
        msg = f"ddof={ddof} must be at least 0 and less than the number of maps ({len(keys)})."
        raise InputError(msg)
    metas = [get_element_meta(sdata, k) for k in keys]
    key = key_added or f"{metas[0].get('image_key', keys[0])}_ensemble"
    sd_key = key + SD_SUFFIX
    if inplace:
        check_new_elements(sdata, {key: "images", sd_key: "images"}, overwrite=overwrite)
    levels = _members(sdata, keys, metas)
    mean, sd = _statistics(levels, ddof)
    first = sdata.images[keys[0]]
    elements = {
        key: _element(mean, levels[0], first),
        sd_key: _element(sd, levels[0], first),
    }
    if not inplace:
        return elements[key], elements[sd_key]
    add_elements(sdata, {k: ("images", el) for k, el in elements.items()})
    base = {k: v for k, v in metas[0].items() if k != "ensemble"}
    for k, statistic in ((key, "mean"), (sd_key, "sd")):
        meta = {**base, "model": f"ensemble of {len(keys)}", "ensemble": {"members": keys, "statistic": statistic}}
        if statistic == "sd":
            meta["ensemble"]["ddof"] = ddof
        set_element_meta(sdata, k, sdata.images[k], meta)
    logger.info("Added sdata.images[%r] (mean) and [%r] (standard deviation) over %d maps.", key, sd_key, len(keys))
    return None


def _members(sdata: SpatialData, keys: list[str], metas: list[dict[str, Any]]) -> list[DataArray]:
    """The full-resolution level of each map, checked to be maps of the same image with the same genes."""
    from spatialdata.transformations import get_transformation

    levels = [scale_levels(sdata.images[k])[0] for k in keys]
    ref, ref_key = levels[0], keys[0]
    genes = [str(c) for c in ref.coords["c"].values]
    ref_t = _matrices(get_transformation(ref, get_all=True))
    for k, level, meta in zip(keys[1:], levels[1:], metas[1:], strict=True):
        other = [str(c) for c in level.coords["c"].values]
        if other != genes:
            msg = (
                f"Maps {ref_key!r} and {k!r} hold different genes (or orders); predict every member with the same "
                "`genes=` (the first differences: "
                f"{[(a, b) for a, b in zip(genes, other, strict=False) if a != b][:3] or (len(genes), len(other))})."
            )
            raise InputError(msg)
        if level.shape != ref.shape:
            msg = (
                f"Maps {ref_key!r} {tuple(ref.shape)} and {k!r} {tuple(level.shape)} differ in shape: members must be "
                "predicted over the same image by models with the same µm per pixel and output stride."
            )
            raise InputError(msg)
        if _matrices(get_transformation(level, get_all=True)) != ref_t:
            msg = f"Maps {ref_key!r} and {k!r} are placed differently (transformations); predict both over one image."
            raise InputError(msg)
        if meta.get("value_kind") != metas[0].get("value_kind"):
            msg = (
                f"Map {ref_key!r} holds {metas[0].get('value_kind')!r} values and {k!r} {meta.get('value_kind')!r}; "
                "an ensemble averages maps of one kind."
            )
            raise InputError(msg)
    return levels


def _matrices(transformations: dict[str, Any]) -> dict[str, tuple[float, ...]]:
    from stpredict._geometry import transformation_matrix

    return {cs: tuple(np.round(transformation_matrix(t).ravel(), 9)) for cs, t in transformations.items()}


def _statistics(levels: list[DataArray], ddof: int) -> tuple[Any, Any]:
    """Lazy float32 mean and standard deviation over the members (two passes over each chunk: exact, stable)."""
    import dask.array as da

    chunks = levels[0].data.chunksize if hasattr(levels[0].data, "chunksize") else "auto"
    stack = da.stack([da.asarray(level.data).rechunk(chunks).astype(np.float32) for level in levels])
    mean = stack.mean(axis=0, dtype=np.float64)
    sd = da.sqrt(((stack - mean[None]) ** 2).sum(axis=0, dtype=np.float64) / (len(levels) - ddof))
    return mean.astype(np.float32), sd.astype(np.float32)


def _element(data: Any, level: DataArray, member: DataTree | DataArray) -> DataTree | DataArray:
    """An image element over ``data`` with the member's channels, transformations and pyramid depth."""
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import get_transformation

    sides = [lv.sizes["y"] for lv in scale_levels(member)]
    factors = [max(2, round(a / b)) for a, b in zip(sides, sides[1:], strict=False)]
    return Image2DModel.parse(
        data,
        dims=("c", "y", "x"),
        c_coords=[str(c) for c in level.coords["c"].values],
        transformations=dict(get_transformation(level, get_all=True)),
        scale_factors=factors or None,
        chunks=data.chunksize,
    )
