"""Whole-slide dense prediction: tiles over tissue, seam-free blending, chunked and resumable writing.

:func:`predict_dense` runs its phases in order: check the arguments, plan the map (:mod:`._dense_plan`), open the
work store (:mod:`._zarr_writer`), compute the units (:mod:`._runners`, :mod:`._blending`), and build the multiscale
image element and add it with its metadata.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from stpredict._elements import add_elements, check_new_elements
from stpredict._errors import InputError
from stpredict._keys import Keys
from stpredict._logging import get_logger
from stpredict._meta import set_element_meta
from stpredict._settings import limit_threads, settings
from stpredict._version import __version__
from stpredict.models._base import DenseModel

from ._blending import Predictor
from ._dense_plan import MapLayout, plan_map
from ._runners import run_distributed, run_local
from ._work_identity import NO_WEIGHTS, identity, model_digest
from ._zarr_writer import WorkStore, install_element, tmp_root

if TYPE_CHECKING:
    from collections.abc import Sequence

    from spatialdata import SpatialData
    from xarray import DataArray, DataTree

__all__ = ["predict_dense"]

logger = get_logger(__name__)

#: Maps up to this many bytes are kept in memory when the SpatialData is not backed and no ``tmp_dir`` is given.
IN_MEMORY_MAX_BYTES = 256 * 2**20


def predict_dense(
    sdata: SpatialData,
    model: DenseModel,
    *,
    image_key: str = Keys.image,
    key_added: str | None = None,
    genes: Sequence[str] | None = None,
    tissue_only: bool = True,
    tissue_key: str | None = None,
    batch_size: int = 16,
    device: str = "auto",
    dtype: Literal["float32", "float16"] = "float32",
    overlap_um: float | None = None,
    chunk_size: int | None = None,
    max_rescale: float = 4.0,
    overwrite: bool = False,
    client: Any | None = None,
    tmp_dir: str | Path | None = None,
    inplace: bool = True,
    show_progress_bar: bool | None = None,
) -> DataTree | None:
    """Predict dense per-gene maps over a whole slide.

    The slide is read from the pyramid level closest to, but not coarser than, the model's µm per pixel and
    resampled to it (area mean when down-sampling, linear when up-sampling). Square tiles of
    ``model.tile_size`` px overlap by ``overlap_um``; each tile's prediction is weighted by a separable window
    that is 0 on the model's ``context`` band and rises and falls as sin²/cos² across the rest of the overlap,
    and the stitched map is the weighted sum divided by the summed weights, so it has no seams. With
    ``tissue_only``, tiles whose support has no tissue are not predicted (the map is 0 there), and a density map
    is 0 outside the tissue mask (at the centres of map pixels) also inside tiles that reach the tissue; an
    intensive map keeps the model's values there, since a 0 would bias unit means at the tissue edge.

    The slide's red, green and blue channels are found by their names (``r``/``g``/``b`` or
    ``red``/``green``/``blue``, any case and order); unnamed (integer) channels are read as red, green, blue in
    that order, and other names are refused. A uint8 image is read as it is; a float image with values in [0, 1]
    is multiplied by 255, one in [0, 255] taken as is, and both rounded to uint8, so they give the map of the
    uint8 image they encode (the range is read from the coarsest pyramid level; an image whose values exceed
    255, or are negative, is refused).

    The map is computed one *unit* (a row of output chunks × a panel of chunk columns) at a time and each
    output chunk is written once, so memory does not grow with the slide. When ``sdata`` is backed by zarr, the
    chunks go to ``<sdata.path>/.stpredict_tmp/<key>/`` with a record of what is computed and of finished units;
    an interrupted run leaves nothing under the final key. A rerun that computes the same map (same model
    weights, by a digest of the model's tensors, genes, normalisation, image, tiling, stride and dtype) resumes
    there, skipping the finished units (logged), and yields a map bit-identical to an uninterrupted run's: each
    unit also stores the sums it carries into the unit below, so every tile is predicted in the same batch as
    without the interruption (a model's output can differ in its last bits with the batch a tile is in). This
    holds when the run is resumed with the same ``batch_size``, ``device`` and ``client`` (or none). A rerun
    that computes another map (say another model with the same genes) discards the unfinished one, with a
    warning that names what differs, and starts again; so does a model that exposes no weights to check
    (``model._checkpoint_state()``, ``model.module.state_dict()`` or ``model.state_dict()``). On completion the
    multiscale element is written to a staging folder and moved into ``images/<key>`` with one rename. A non-backed
    ``sdata`` keeps maps up to 256 MiB in memory and larger ones in ``tmp_dir`` (default: a new temporary folder
    that the element reads from lazily, so it must stay until the SpatialData is written elsewhere); with
    ``tmp_dir`` given, runs resume there too.

    Parameters
    ----------
    sdata
        SpatialData with a calibrated RGB image (:func:`stpredict.pp.calibrate`): uint8, or float in [0, 1] or
        [0, 255].
    model
        Any :class:`stpredict.models.DenseModel`.
    image_key
        Key of the H&E image.
    key_added
        Key of the map; default ``Keys.dense(image_key, model.name)`` (``"he_pixnet"``).
    genes
        Genes to keep, in this order; default all of ``model.var_names``.
    tissue_only
        Predict only tiles with tissue (and set a density map to 0 outside it), from labels ``tissue_key``, else
        labels ``"<image_key>_tissue"``, else a mask computed with :func:`stpredict.pp.tissue_mask` (not stored).
    tissue_key
        Labels element of the tissue mask (1 = tissue).
    batch_size
        Tiles per model call; halved automatically (with a warning) when the GPU runs out of memory.
    device
        Passed to ``model.predict_tiles``; ``"auto"`` uses ``settings.device``.
    dtype
        Storage type of the map; blending is always done in float32.
    overlap_um
        Overlap of neighbouring tiles in µm; at least ``2 * model.context`` px. Default: twice the context plus
        an eighth of the tile.
    chunk_size
        Output chunk length in map pixels, rounded to a multiple of the tile stride. Default about 512, less for
        models with a coarse map (MagNet), so that one work unit reads at most 32 Mpx of the slide.
    max_rescale
        Largest accepted factor between the µm per pixel of the level read and the model's.
    overwrite
        Replace an existing element ``key_added``.
    client
        A :class:`dask.distributed.Client`: units are computed on its workers (model and slide sent once with
        ``client.scatter``); the blocks come back to this process, which writes them, so workers need no
        access to the output store.
    tmp_dir
        Folder for the unfinished map of a non-backed ``sdata`` (resumable).
    inplace
        Add the map to ``sdata``; with ``False`` return it (computed in memory or ``tmp_dir``).
    show_progress_bar
        Default ``settings.show_progress_bar``.

    Returns
    -------
    ``None``, or with ``inplace=False`` the map: a multiscale image (``c`` = genes, ``y``, ``x``) whose
    transformations are the image's, each preceded by ``Scale`` of the image pixels per map pixel. Its
    ``attrs["stpredict"]`` (and ``sdata.attrs["stpredict"]["elements"][key]``) record ``value_kind``,
    ``model``, ``stpredict_version``, ``um_per_px`` and ``stride``.

    Raises
    ------
    CalibrationError
        If the image's µm per pixel is unknown.
    InputError
        On genes the model lacks, a slide/model scale mismatch beyond ``max_rescale``, no tissue, a key that
        exists without ``overwrite``, invalid sizes, channel names that do not say which is red, green and blue,
        values that are not RGB, or a work folder (``tmp_dir/<key>``) that stpredict did not create.
    MemoryError
        If the GPU runs out of memory even with one tile per batch.
    """
    limit_threads()
    key, gene_list = _check_arguments(
        sdata, model, image_key, key_added, genes, dtype, batch_size, inplace=inplace, overwrite=overwrite
    )
    layout = plan_map(
        sdata,
        image_key,
        model,
        gene_list,
        tissue_only=tissue_only,
        tissue_key=tissue_key,
        overlap_um=overlap_um,
        chunk_size=chunk_size,
        max_rescale=max_rescale,
    )
    backed = inplace and sdata.is_backed()
    store = _open_work_store(sdata, key, layout, model, gene_list, dtype, backed=backed, tmp_dir=tmp_dir)
    _compute_units(
        store,
        layout,
        model,
        key,
        dtype=dtype,
        batch_size=batch_size,
        device=device,
        client=client,
        show_progress_bar=show_progress_bar,
    )
    element = _build_element(store, layout, gene_list)
    meta = _element_meta(layout, model, tissue_only=tissue_only, dtype=dtype)
    if not inplace:
        element.attrs["stpredict"] = meta
        return element
    _add_element(sdata, key, element, meta, store, layout, backed=backed, overwrite=overwrite)
    return None


def _check_model(model: Any) -> None:
    """Check that ``model`` satisfies :class:`~stpredict.models.DenseModel` and that its sizes fit together."""
    if not isinstance(model, DenseModel):
        missing = [a for a in ("name", "var_names", "um_per_px", "output_stride", "tile_size", "context",
                               "value_kind", "predict_tiles") if not hasattr(model, a)]  # fmt: skip
        msg = f"`model` does not satisfy stpredict.models.DenseModel; it lacks {missing}."
        raise InputError(msg)
    if model.output_stride < 1 or model.tile_size % model.output_stride:
        msg = (
            f"model.tile_size ({model.tile_size}) must be a positive multiple of output_stride ({model.output_stride})."
        )
        raise InputError(msg)
    if not model.um_per_px or model.um_per_px <= 0:
        msg = f"model.um_per_px must be positive, got {model.um_per_px!r}."
        raise InputError(msg)
    if len(set(model.var_names)) != len(model.var_names) or not len(model.var_names):
        msg = "model.var_names must be a non-empty list of unique gene names."
        raise InputError(msg)
    if model.value_kind not in ("density", "intensive"):
        msg = f"model.value_kind must be 'density' or 'intensive', got {model.value_kind!r}."
        raise InputError(msg)


def _check_arguments(
    sdata: SpatialData,
    model: DenseModel,
    image_key: str,
    key_added: str | None,
    genes: Sequence[str] | None,
    dtype: str,
    batch_size: int,
    *,
    inplace: bool,
    overwrite: bool,
) -> tuple[str, list[str]]:
    """Check everything that does not need the slide's pixels, before anything is touched; the key and the genes."""
    if image_key not in sdata.images:
        msg = f"No image {image_key!r} in the SpatialData; available images: {sorted(sdata.images)}."
        raise KeyError(msg)
    _check_model(model)
    key = key_added or Keys.dense(image_key, model.name)
    if key == image_key:
        msg = f"key_added must differ from image_key ({image_key!r})."
        raise InputError(msg)
    if inplace:
        check_new_elements(sdata, {key: "images"}, overwrite=overwrite, on_disk=True)
    gene_list = list(model.var_names) if genes is None else list(genes)
    missing = [g for g in gene_list if g not in set(model.var_names)]
    if missing or not gene_list or len(set(gene_list)) != len(gene_list):
        msg = (
            f"The model {model.name!r} does not predict {missing[:10]}{' …' if len(missing) > 10 else ''} "
            f"({len(missing)} of {len(gene_list)} requested genes); it predicts {len(model.var_names)} genes "
            "(model.var_names). Request a subset of those, without duplicates."
        )
        raise InputError(msg)
    if dtype not in ("float32", "float16"):
        msg = f"dtype must be 'float32' or 'float16', got {dtype!r}."
        raise InputError(msg)
    if batch_size < 1:
        msg = f"batch_size must be at least 1, got {batch_size}."
        raise InputError(msg)
    return key, gene_list


def _open_work_store(
    sdata: SpatialData,
    key: str,
    layout: MapLayout,
    model: DenseModel,
    gene_list: list[str],
    dtype: str,
    *,
    backed: bool,
    tmp_dir: str | Path | None,
) -> WorkStore:
    """The store the map is written to, resumed from an interrupted run of the same map.

    It lies in the SpatialData's zarr store when backed, else in ``tmp_dir``, else in memory when small, else in a
    new temporary folder. The weights are hashed only for a store that can be resumed.
    """
    shape = layout.shape
    if backed:
        work_path: Path | None = tmp_root(Path(sdata.path)) / key
    elif tmp_dir is not None:
        work_path = Path(tmp_dir) / key
    elif np.prod(shape) * np.dtype(dtype).itemsize <= IN_MEMORY_MAX_BYTES:
        work_path = None
    else:
        work_path = Path(tempfile.mkdtemp(prefix=f"stpredict_{key}_"))
    digest = None if work_path is None else model_digest(model)
    fingerprint = identity(layout, model, gene_list, dtype, digest)
    no_resume = None if digest is not None else NO_WEIGHTS.format(name=model.name)
    return WorkStore(work_path, shape, layout.chunks, dtype, fingerprint, no_resume=no_resume)


def _compute_units(
    store: WorkStore,
    layout: MapLayout,
    model: DenseModel,
    key: str,
    *,
    dtype: str,
    batch_size: int,
    device: str,
    client: Any | None,
    show_progress_bar: bool | None,
) -> None:
    """Compute the units not yet in ``store`` (here or on ``client``'s workers) and write their blocks to it."""
    from tqdm.auto import tqdm

    plan, tissue, f = layout.plan, layout.tissue, layout.image_px_per_map_px
    gy = plan.gy
    # A density (expected counts per µm²) is 0 where there is no tissue; an intensive value (e.g. log1p CPM)
    # has no value there, and a 0 would bias every unit mean that reaches the tissue edge, so it is left as is.
    mask_outside = tissue is not None and model.value_kind == "density"
    dev = settings.device if device == "auto" else device
    units = [u for u in plan.units() if u not in store.done]
    if store.resumed:
        logger.info(
            "predict_dense %r: resuming the interrupted run in %s; %d of %d units are written and skipped.",
            key, store.path, len(plan.units()) - len(units), len(plan.units()),
        )  # fmt: skip
    progress = tqdm(
        total=len(plan.units()),
        initial=len(plan.units()) - len(units),
        desc=f"predict_dense {key}",
        unit="unit",
        disable=not (settings.show_progress_bar if show_progress_bar is None else show_progress_bar),
    )
    n_tiles = int(plan.run.sum())
    logger.info(
        "predict_dense %r: %d tiles of %d px over tissue, map %s, %d units (%d to do).",
        key, n_tiles, plan.tile, layout.shape, len(plan.units()), len(units),
    )  # fmt: skip

    write_seconds = [0.0]

    def write(unit: tuple[int, int], block: np.ndarray | None, carry: tuple[np.ndarray, np.ndarray] | None) -> None:
        t0 = time.perf_counter()
        if block is not None:
            y0, y1 = gy.chunk_bounds(unit[0])
            x0, x1 = plan.panel_bounds(unit[1])
            if mask_outside:  # no expression off the tissue, also inside tiles that reach it
                block = block * tissue.at_map_pixels(y0, y0 + block.shape[1], x0, x0 + block.shape[2], f)[None]
            store.array[:, y0:y1, x0:x1] = block.astype(dtype, copy=False)
        store.mark_done(unit, carry)
        progress.update(1)
        write_seconds[0] += time.perf_counter() - t0

    t_start = time.perf_counter()
    try:
        if client is None:
            predictor = Predictor(model, batch_size, dev)
            read_seconds = run_local(plan, layout.level.data, predictor, units, write, store.carry_into)
            logger.info(
                "predict_dense %r: %.1f s; model %.1f s (%d calls), blending %.1f s, reading %.1f s (prefetched), "
                "writing %.1f s (in the background).",
                key, time.perf_counter() - t_start, predictor.seconds, predictor.n_calls, predictor.blend_seconds,
                read_seconds, write_seconds[0],
            )  # fmt: skip
        else:
            run_distributed(client, plan, layout.level.data, model, batch_size, dev, units, write)
    finally:
        progress.close()


def _build_element(store: WorkStore, layout: MapLayout, gene_list: list[str]) -> DataTree | DataArray:
    """The multiscale image element over the stored map, halved down to ~256 px, in the image's coordinate systems."""
    import dask.array as da
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale, Sequence, get_transformation

    height, width, f = layout.plan.gy.size, layout.plan.gx.size, layout.image_px_per_map_px
    data = da.from_zarr(store.array)
    scale_factors = [2] if min(height, width) >= 2 else []  # always multiscale, halved down to ~256 px
    side = min(height, width) // 2
    while side // 2 >= 256:
        scale_factors.append(2)
        side //= 2
    transformations = {
        cs: Sequence([Scale([f, f], axes=("x", "y")), tr])
        for cs, tr in get_transformation(layout.image, get_all=True).items()
    }
    return Image2DModel.parse(
        data,
        dims=("c", "y", "x"),
        c_coords=gene_list,
        transformations=transformations,
        scale_factors=scale_factors or None,
        chunks=layout.chunks,
    )


def _element_meta(layout: MapLayout, model: DenseModel, *, tissue_only: bool, dtype: str) -> dict:
    """The map's metadata: ``attrs["stpredict"]`` of the element and ``sdata.attrs["stpredict"]["elements"][key]``."""
    s, f = layout.plan.stride, layout.image_px_per_map_px
    return {
        "value_kind": model.value_kind,
        "model": model.name,
        "stpredict_version": __version__,
        "um_per_px": float(model.um_per_px * s),
        "stride": float(f),
        "image_key": layout.image_key,
        "tile_size": int(layout.plan.tile),
        "overlap_px": int(layout.overlap * s),
        "tissue_only": bool(tissue_only),
        "dtype": dtype,
    }


def _add_element(
    sdata: SpatialData,
    key: str,
    element: DataTree | DataArray,
    meta: dict,
    store: WorkStore,
    layout: MapLayout,
    *,
    backed: bool,
    overwrite: bool,
) -> None:
    """Add the map to ``sdata`` with its metadata; when backed, move it into the zarr store and drop the work store."""
    if backed:
        element = install_element(sdata, key, element, staging=store.path, overwrite=overwrite)
        sdata.images[key] = element
        set_element_meta(sdata, key, element, meta)
        sdata.write_attrs()
        store.remove()
    else:
        add_elements(sdata, {key: ("images", element)})
        set_element_meta(sdata, key, element, meta)
    (_, height, width), f = layout.shape, layout.image_px_per_map_px
    logger.info(
        "Added sdata.images[%r]: %d genes, %d × %d px at %.4g µm/px.",
        key, layout.shape[0], height, width, f * layout.image_um_per_px,
    )  # fmt: skip
