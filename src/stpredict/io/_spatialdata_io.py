"""Thin helpers over the spatialdata-io readers for 10x Visium, Visium HD and Xenium.

Each calls the spatialdata-io reader, keeps the H&E image under ``image_key`` (``"he"``), and calibrates it:
``um_per_px`` if given, else the scale recorded by the reader (:func:`stpredict.io.infer_um_per_px`). Tables,
shapes and their annotation keys stay as spatialdata-io writes them, except where a helper documents a rename;
downstream code reads ``region``/``region_key``/``instance_key`` from ``table.uns["spatialdata_attrs"]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from stpredict._errors import InputError
from stpredict._geometry import get_element, set_um_per_px
from stpredict._keys import Keys
from stpredict._logging import get_logger
from stpredict._meta import set_element_meta

from ._build import check_positive
from ._metadata import (
    VISIUM_SCALEFACTOR_SPOT_UM,
    VISIUM_SPOT_DIAMETER_UM,
    infer_um_per_px,
    visium_um_per_unit,
)
from ._tenx_layout import check_visium_hd_layout, check_visium_layout, check_xenium_layout, reader_options

if TYPE_CHECKING:
    from spatialdata import SpatialData

__all__ = ["adopt_image", "read_visium", "read_visium_hd", "read_xenium", "rename_element"]

logger = get_logger(__name__)

ImageChoice = Literal["auto", "full", "hires", "lowres"]
_VISIUM_SUFFIXES = {"full": "_full_image", "hires": "_hires_image", "lowres": "_lowres_image"}
_COUNTS_FILE = "filtered_feature_bc_matrix.h5"


def read_visium(
    path: str | Path,
    *,
    dataset_id: str | None = None,
    image_resolution: ImageChoice = "auto",
    image_file: str | Path | None = None,
    um_per_px: float | None = None,
    image_key: str = Keys.image,
    shapes_key: str = Keys.spots,
    table_key: str = Keys.table,
    **kwargs: Any,
) -> SpatialData:
    """Read a Space Ranger Visium output folder with :func:`spatialdata_io.visium`, in stpredict's layout.

    Parameters
    ----------
    path
        The Space Ranger ``outs`` folder (``filtered_feature_bc_matrix.h5``, ``spatial/``).
    dataset_id
        Passed to spatialdata-io; defaults to the folder name when the counts file has no library prefix.
    image_resolution
        Which image becomes ``images[image_key]``: ``"full"`` (the microscope image, needs ``image_file``),
        ``"hires"``, ``"lowres"``, or ``"auto"`` = the finest one present. The others stay under spatialdata-io's
        names.
    image_file
        The full-resolution H&E given to Space Ranger (relative to ``path`` or absolute).
    um_per_px
        Override the pixel size; by default it follows from the array: spot centres are 100 µm apart along a
        row, fitted against ``array_row``/``array_col`` (else from ``spot_diameter_fullres``, which Space
        Ranger defines as the width of a theoretical 65 µm spot), and the chosen image's scale factor maps full
        resolution pixels to its pixels.
    image_key, shapes_key, table_key
        Names of the image, the spot circles (renamed from ``dataset_id``) and the table.
    kwargs
        Passed to :func:`spatialdata_io.visium` (e.g. ``counts_file``).

    Returns
    -------
    SpatialData with ``images[image_key]``, ``shapes[shapes_key]`` (circles in full-resolution pixels, index =
    ``spot_id``, with the capture spot's true 55 µm diameter rather than spatialdata-io's 65 µm
    ``spot_diameter_fullres``, so that aggregation covers what was measured), ``tables[table_key]`` (counts;
    ``region_key="region"``, ``instance_key="spot_id"``, ``obsm["spatial"]`` in full-resolution pixels),
    all calibrated in the ``"um"`` coordinate system.

    Raises
    ------
    InputError
        Before anything is read, if the folder is not a complete Space Ranger output for the options given: one
        message lists every missing or unreadable file (counts, ``spatial/scalefactors_json.json`` and its keys,
        ``spatial/tissue_positions.csv`` or Space Ranger 1.x's ``tissue_positions_list.csv``, an H&E image).
    """
    import spatialdata_io

    folder = Path(path)
    _check_image_resolution(image_resolution)
    check_visium_layout(
        folder,
        options=reader_options(spatialdata_io.visium, kwargs),
        image_file=image_file,
        image_resolution=image_resolution,
    )
    if dataset_id is None and (folder / kwargs.get("counts_file", _COUNTS_FILE)).is_file():
        dataset_id = folder.name
    if image_file is not None:
        kwargs["fullres_image_file"] = image_file
    sdata = spatialdata_io.visium(folder, dataset_id=dataset_id, **kwargs)
    dataset_id = dataset_id or _single_shapes_key(sdata)
    chosen = _choose_visium_image(sdata, dataset_id, image_resolution)
    if dataset_id in sdata.shapes:
        rename_element(sdata, dataset_id, shapes_key)
    if "table" in sdata.tables and table_key != "table":
        sdata.tables[table_key] = sdata.tables.pop("table")
    _counts_as_float32(sdata)
    sdata = adopt_image(sdata, chosen, image_key=image_key, um_per_px=um_per_px, source=str(folder))
    if shapes_key in sdata.shapes:
        _circles_at_capture_size(sdata, shapes_key)  # after the pixel size is inferred from the reader's circles
    return sdata


def read_visium_hd(
    path: str | Path,
    *,
    dataset_id: str | None = None,
    image_resolution: ImageChoice = "auto",
    image_file: str | Path | None = None,
    um_per_px: float | None = None,
    image_key: str = Keys.image,
    **kwargs: Any,
) -> SpatialData:
    """Read a Space Ranger Visium HD output folder with :func:`spatialdata_io.visium_hd` and calibrate it.

    Bins stay as spatialdata-io writes them: shapes ``"<dataset_id>_square_008um"`` (etc.) in full-resolution
    pixels, tables ``"square_008um"`` (etc.). The pixel size follows from the bins' nominal size in µm and their
    size in pixels, unless ``um_per_px`` is given.

    Parameters
    ----------
    path
        The Space Ranger ``outs`` folder.
    dataset_id
        Passed to spatialdata-io (inferred from the file names by default).
    image_resolution
        ``"full"``, ``"hires"``, ``"lowres"`` or ``"auto"`` (the finest present) becomes ``images[image_key]``.
    image_file
        The full-resolution H&E given to Space Ranger (relative to ``path`` or absolute; by default spatialdata-io
        looks in ``microscope_image/``).
    um_per_px
        Override the pixel size.
    image_key
        Name of the chosen H&E image.
    kwargs
        Passed to :func:`spatialdata_io.visium_hd` (e.g. ``bin_size=8``).

    Returns
    -------
    SpatialData with ``images[image_key]`` calibrated in the ``"um"`` coordinate system, and spatialdata-io's bins
    and tables.

    Raises
    ------
    InputError
        Before anything is read, if the folder is not a complete Space Ranger Visium HD output for the options given:
        one message lists every missing or unreadable piece (``feature_slice.h5``, the scale factors and their keys,
        each ``binned_outputs/square_NNNum/`` with its counts, ``spatial/tissue_positions.parquet`` and
        ``spatial/scalefactors_json.json``, an H&E image).
    """
    import spatialdata_io

    folder = Path(path)
    _check_image_resolution(image_resolution)
    if image_file is not None:
        image_file = folder / image_file  # spatialdata-io takes it relative to the working directory
        kwargs["fullres_image_file"] = image_file
    check_visium_hd_layout(
        folder,
        options=reader_options(spatialdata_io.visium_hd, kwargs),
        dataset_id=dataset_id,
        image_file=image_file,
        image_resolution=image_resolution,
    )
    sdata = spatialdata_io.visium_hd(folder, dataset_id=dataset_id, **kwargs)
    prefix = dataset_id or _common_prefix([k for k in sdata.images if k.endswith(tuple(_VISIUM_SUFFIXES.values()))])
    chosen = _choose_visium_image(sdata, prefix, image_resolution)
    _counts_as_float32(sdata)
    return adopt_image(sdata, chosen, image_key=image_key, um_per_px=um_per_px, source=str(path))


def read_xenium(
    path: str | Path,
    *,
    source_image_key: str = "he_image",
    um_per_px: float | None = None,
    image_key: str = Keys.image,
    cells_as_circles: bool = True,
    **kwargs: Any,
) -> SpatialData:
    """Read a Xenium output folder with :func:`spatialdata_io.xenium`, keeping the aligned H&E as ``image_key``.

    The H&E must be in the bundle as ``*he_image.ome.tif`` with its ``*he_imagealignment.csv`` (what
    spatialdata-io's ``aligned_images=True`` reads); for an H&E registered elsewhere, add it with
    :func:`spatialdata_io.xenium_aligned_image` first, or build the layout with
    :func:`stpredict.io.from_image_and_table`. The pixel size follows from the transcripts, which Xenium stores in
    µm, mapped into the H&E's pixels through the alignment, unless ``um_per_px`` is given.

    Parameters
    ----------
    path
        The Xenium output folder.
    source_image_key
        Key spatialdata-io gives the aligned H&E (it becomes ``images[image_key]``).
    um_per_px
        Override the pixel size.
    image_key
        Name of the H&E image in the result.
    cells_as_circles
        Make the table annotate circles of the cells' areas (spatialdata-io's ``cells_as_circles``). The default
        here is ``True``: training (:meth:`stpredict.models.PixNet.fit`) needs the cells as shapes, and with
        ``False`` the table annotates the cell labels instead (which :func:`stpredict.tl.aggregate` can use with
        ``labels_key=``).
    kwargs
        Passed to :func:`spatialdata_io.xenium` (e.g. ``transcripts=True``).

    Returns
    -------
    SpatialData with ``images[image_key]`` calibrated in the ``"um"`` coordinate system, and spatialdata-io's cells,
    transcripts and table.

    Raises
    ------
    InputError
        Before anything is read, if a file that spatialdata-io reads for the options given is missing or unreadable
        (one message lists them all), or the H&E or its alignment CSV is not in the folder.
    """
    import spatialdata_io

    kwargs = {**kwargs, "cells_as_circles": cells_as_circles}
    check_xenium_layout(
        Path(path), options=reader_options(spatialdata_io.xenium, kwargs), source_image_key=source_image_key
    )
    sdata = spatialdata_io.xenium(path, **kwargs)
    if source_image_key not in sdata.images:
        msg = (
            f"The Xenium bundle at {str(path)!r} has no aligned H&E image {source_image_key!r} (images: "
            f"{sorted(sdata.images)}). Put the `*he_image.ome.tif` and its alignment CSV into the folder, keep "
            "`aligned_images=True`, or pass `source_image_key=` with the right name."
        )
        raise InputError(msg)
    _counts_as_float32(sdata)
    return adopt_image(sdata, source_image_key, image_key=image_key, um_per_px=um_per_px, source=str(path))


def adopt_image(
    sdata: SpatialData,
    name: str,
    *,
    image_key: str = Keys.image,
    um_per_px: float | None = None,
    source: str | None = None,
) -> SpatialData:
    """Rename image ``name`` to ``image_key`` and calibrate it (``um_per_px`` or inferred from the metadata).

    Raises
    ------
    InputError
        If the pixel size is neither given nor recorded; nothing is changed then.
    """
    if um_per_px is not None:
        value = check_positive(um_per_px, "um_per_px", "Pass the image's pixel size in micrometres.")
    else:
        inferred = infer_um_per_px(sdata, name)
        if inferred is None:
            msg = (
                f"The pixel size of image {name!r} is not recorded in the reader's metadata. Pass `um_per_px=` "
                "(micrometres per pixel of that image)."
            )
            raise InputError(msg)
        value = inferred
    rename_element(sdata, name, image_key)
    set_um_per_px(sdata, image_key, value)
    meta = {"um_per_px": value, "reader": sdata.attrs.get("spatialdata_io_reader"), "element": name}
    if source is not None:
        meta["source"] = source
    set_element_meta(sdata, image_key, sdata.images[image_key], {k: v for k, v in meta.items() if v is not None})
    logger.info("Image %r (was %r) at %.6g µm per pixel.", image_key, name, value)
    return sdata


def rename_element(sdata: SpatialData, old: str, new: str) -> None:
    """Rename an image/labels/shapes/points element in memory and retarget the tables that annotate it."""
    if old == new:
        return
    element = get_element(sdata, old)
    group = next(g for g in ("images", "labels", "shapes", "points") if old in getattr(sdata, g))
    if new in {name for _, name, _ in sdata.gen_elements()}:
        msg = f"Cannot rename {old!r} to {new!r}: an element {new!r} exists. Choose another key."
        raise InputError(msg)
    getattr(sdata, group)[new] = element
    for table in sdata.tables.values():
        attrs = table.uns.get("spatialdata_attrs", {})
        region = attrs.get("region")
        regions = [region] if isinstance(region, str) else list(region or [])
        if old not in regions:
            continue
        region_key = attrs["region_key"]
        values = table.obs[region_key].astype(str).replace(old, new)
        table.obs[region_key] = pd.Categorical(values)
        attrs["region"] = new if isinstance(region, str) else [new if r == old else r for r in regions]
    del getattr(sdata, group)[old]


def _circles_at_capture_size(sdata: SpatialData, shapes_key: str) -> None:
    """Set the spot circles' radius to the 55 µm capture spot (spatialdata-io draws the 65 µm scale-factor spot)."""
    shapes = sdata.shapes[shapes_key]
    if "radius" not in shapes.columns or len(shapes) == 0:
        return
    um_per_unit = visium_um_per_unit(sdata, shapes_key)
    if um_per_unit is None:
        um_per_unit = VISIUM_SCALEFACTOR_SPOT_UM / (2 * float(np.median(shapes["radius"])))
    shapes["radius"] = VISIUM_SPOT_DIAMETER_UM / 2 / um_per_unit


def _counts_as_float32(sdata: SpatialData) -> None:
    """Tables whose ``X`` holds raw counts get them as csr float32 (stpredict's convention); others are left."""
    from scipy import sparse

    from stpredict._validation import check_raw_counts

    for name, table in sdata.tables.items():
        if table.X is None or (sparse.issparse(table.X) and table.X.dtype == np.float32 and table.X.format == "csr"):
            continue
        try:
            check_raw_counts(table.X, name=f"tables[{name!r}].X")
        except InputError as error:
            logger.info("Table %r left as read: %s", name, error)
            continue
        table.X = sparse.csr_matrix(table.X, dtype=np.float32)


def _check_image_resolution(choice: str) -> None:
    if choice not in ("auto", *_VISIUM_SUFFIXES):
        msg = f"image_resolution must be 'auto', 'full', 'hires' or 'lowres', got {choice!r}."
        raise InputError(msg)


def _choose_visium_image(sdata: SpatialData, prefix: str | None, choice: ImageChoice) -> str:
    order = ("full", "hires", "lowres") if choice == "auto" else (choice,)
    _check_image_resolution(choice)
    for option in order:
        name = f"{prefix or ''}{_VISIUM_SUFFIXES[option]}"
        if name in sdata.images:
            return name
    msg = (
        f"No {choice if choice != 'auto' else 'H&E'} image found (images: {sorted(sdata.images)}). For the full "
        "resolution image pass `image_file=`; otherwise choose `image_resolution=` among those present."
    )
    raise InputError(msg)


def _single_shapes_key(sdata: SpatialData) -> str | None:
    return next(iter(sdata.shapes), None) if len(sdata.shapes) == 1 else None


def _common_prefix(names: list[str]) -> str | None:
    for suffix in _VISIUM_SUFFIXES.values():
        for name in names:
            if name.endswith(suffix):
                return name[: -len(suffix)]
    return None
