"""Whole-slide scans (SVS, NDPI, MRXS, pyramidal OME-TIFF, tiled TIFF) opened lazily as multiscale SpatialData images.

:func:`read_wsi` opens the file with `tiffslide <https://github.com/Bayer-Group/tiffslide>`_ (pure Python, on
tifffile and zarr), or with OpenSlide where tiffslide cannot read the format (MRXS) and ``openslide-python`` is
installed. Nothing is decoded when the file is opened: every pyramid level of the file becomes one level of a
multiscale image (``scale0``, ``scale1``, …), a dask array whose chunks are whole multiples of the file's tiles, each
decoded from the file when (and only when) that chunk is computed. A scan of any size therefore costs memory in
proportion to the chunks read, never to the slide; :func:`stpredict.tl.predict_dense` reads the level closest to
the model's µm per pixel, chunk by chunk.

Where the file's pyramid stops above :data:`~stpredict.io._image.COARSEST_LEVEL_PX` pixels (a flat tiled TIFF),
further levels are added as lazy 2 × 2 block means of the coarsest file level (integer mean, truncated, as
:func:`~stpredict.io._image.build_image` computes them), so that coarse models and the tissue mask never resample
the full-resolution scan. As for every multiscale SpatialData image, the transformation of level ``i`` is the scale
``shape(scale0) / shape(scale i)`` per axis (spatialdata derives it from the shapes), i.e. the level's downsample.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from stpredict._errors import InputError
from stpredict._geometry import set_um_per_px
from stpredict._keys import Keys
from stpredict._logging import get_logger
from stpredict._meta import set_element_meta

from ._build import GLOBAL_CS, check_positive
from ._image import COARSEST_LEVEL_PX

if TYPE_CHECKING:
    import os

    from spatialdata import SpatialData

__all__ = ["read_wsi"]

logger = get_logger(__name__)

Backend = Literal["auto", "tiffslide", "openslide"]
#: Suffixes tiffslide cannot read (no TIFF container); they go to OpenSlide.
OPENSLIDE_ONLY_SUFFIXES = {".mrxs", ".vms", ".vmu", ".scn.zip"}
#: TIFF resolution tags in inches at these dots per inch are writer defaults (screens, printers), not a scan's size.
_DEFAULT_DPI = {72.0, 96.0, 150.0, 300.0, 600.0}
_INSTALL_OPENSLIDE = "pip install openslide-python openslide-bin"
_OPENERS_LOCK = threading.Lock()


def read_wsi(
    path: str | os.PathLike[str],
    *,
    image_key: str = Keys.image,
    um_per_px: float | None = None,
    backend: Backend = "auto",
    chunk_px: int = 1024,
    coarsest_px: int = COARSEST_LEVEL_PX,
) -> SpatialData:
    """Open a whole-slide scan lazily as a multiscale H&E image, calibrated in micrometres.

    Parameters
    ----------
    path
        The scan: Aperio ``.svs``, Hamamatsu ``.ndpi``, pyramidal OME-TIFF, a tiled (pyramidal or flat) TIFF, or
        any format OpenSlide reads (``.mrxs`` and others; needs ``openslide-python``).
    image_key
        Name of the image element.
    um_per_px
        Micrometres per pixel of the full-resolution level; by default read from the file (``tiffslide.mpp-x/-y``:
        the Aperio ``MPP`` field, OME ``PhysicalSizeX/Y``, TIFF resolution tags in cm/mm/µm or in inches beyond
        writer defaults; OpenSlide's ``openslide.mpp-x/-y``). Given, it overrides the file.
    backend
        ``"tiffslide"``, ``"openslide"``, or ``"auto"``: tiffslide, and OpenSlide (where installed) for files
        that tiffslide cannot open.
    chunk_px
        Approximate chunk edge of the dask arrays in pixels, rounded to a whole number of the file's tiles.
    coarsest_px
        Lazy 2 × 2 block-mean levels are added below the file's coarsest level until its longer side is at most
        this many pixels.

    Returns
    -------
    SpatialData with ``images[image_key]``: uint8 ``(c=["r", "g", "b"], y, x)`` multiscale (a DataTree whose
    ``scale0``, ``scale1``, … are the file's levels, finest first, then any added levels), dask-backed and
    read tile by tile; transformations ``Identity`` to ``"global"`` (full-resolution pixels) and
    ``Scale(um_per_px)`` to ``"um"``. Alpha is dropped; a greyscale scan is repeated into R, G and B. The element's
    ``attrs["stpredict"]`` records ``um_per_px``, the source file, the backend, the vendor and the file's level
    downsamples.

    Raises
    ------
    InputError
        If the file is missing or not a slide that the backends read, if its pixels are not 8-bit RGB(A) or grey,
        or if its pixel size is not recorded (pass ``um_per_px=``).
    """
    from spatialdata import SpatialData

    source = _check_path(path)
    if backend not in ("auto", "tiffslide", "openslide"):
        msg = f"backend must be 'auto', 'tiffslide' or 'openslide', got {backend!r}."
        raise InputError(msg)
    chunk_px = int(check_positive(chunk_px, "chunk_px", "Pass a chunk edge in pixels, e.g. 1024."))
    opener = _open(source, backend)
    slide = opener.open()
    levels = [_Level(opener, i, shape) for i, shape in enumerate(opener.level_shapes(slide))]
    if um_per_px is not None:
        value = check_positive(um_per_px, "um_per_px", "Pass the scan's pixel size in micrometres.")
    else:
        value = _recorded_um_per_px(opener, slide, source)
    arrays = [_lazy(level, opener.level_chunks(slide, level.index), chunk_px, source) for level in levels]
    n_file_levels = len(arrays)
    while max(arrays[-1].shape[1:]) > coarsest_px and min(arrays[-1].shape[1:]) >= 2:
        arrays.append(_halve_lazy(arrays[-1], chunk_px))
    element = _multiscale(arrays)
    sdata = SpatialData(images={image_key: element})
    set_um_per_px(sdata, image_key, value)
    meta = {
        "um_per_px": value,
        "source": str(source),
        "reader": f"stpredict.io.read_wsi ({opener.name})",
        "vendor": opener.vendor(slide),
        "file_levels": n_file_levels,
        "level_downsamples": [_downsample(arrays[0], a) for a in arrays],
    }
    set_element_meta(sdata, image_key, sdata.images[image_key], {k: v for k, v in meta.items() if v is not None})
    logger.info(
        "Opened %s lazily with %s: %d × %d px at %.6g µm/px, %d file level(s)%s.",
        source.name,
        opener.name,
        arrays[0].shape[2],
        arrays[0].shape[1],
        value,
        n_file_levels,
        f" + {len(arrays) - n_file_levels} computed" if len(arrays) > n_file_levels else "",
    )
    return sdata


# --------------------------------------------------------------------------- opening


def _check_path(path: str | os.PathLike[str]) -> Path:
    source = Path(path)
    if source.is_file():
        return source.resolve()
    if source.is_dir():
        msg = (
            f"{str(source)!r} is a folder, not a slide file. Pass the scan itself (e.g. the .svs, .ndpi, .tif or the "
            ".mrxs file next to its data folder)."
        )
    else:
        msg = f"Slide file {str(source)!r} does not exist. Pass the path of the whole-slide scan."
    raise InputError(msg)


def _open(source: Path, backend: Backend) -> _Opener:
    wants_openslide = backend == "openslide" or (
        backend == "auto" and any(source.name.lower().endswith(s) for s in OPENSLIDE_ONLY_SUFFIXES)
    )
    if not wants_openslide:
        opener: _Opener = _TiffSlideOpener(source)
        try:
            opener.open()
        except _NotReadable as error:
            if backend == "tiffslide" or not _has_openslide():
                hint = "" if backend == "tiffslide" else f" OpenSlide reads more formats: `{_INSTALL_OPENSLIDE}`."
                msg = f"tiffslide cannot read {str(source)!r} ({error.reason}). Is it a whole-slide scan?{hint}"
                raise InputError(msg) from error
            logger.info("tiffslide cannot read %s (%s); trying OpenSlide.", source.name, error.reason)
        else:
            return opener
    if not _has_openslide():
        msg = (
            f"Reading {source.name!r} needs OpenSlide, which is not installed. Install it with "
            f"`{_INSTALL_OPENSLIDE}`, or convert the scan to a pyramidal OME-TIFF (e.g. with bfconvert or vips)."
        )
        raise InputError(msg)
    opener = _OpenSlideOpener(source)
    opener.open()
    return opener


def _has_openslide() -> bool:
    try:
        import openslide  # noqa: F401
    except ImportError:  # also OSError-like failures of the shared library are ImportErrors in openslide-python
        return False
    return True


class _NotReadable(Exception):
    def __init__(self, reason: object) -> None:
        super().__init__(str(reason))
        self.reason = reason


class _Opener:
    """Opens one slide file with one backend, once per process (picklable: the handle is not sent)."""

    name = ""

    def __init__(self, source: Path) -> None:
        self.source = source
        self._slide: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_slide": None}

    def open(self) -> Any:
        if self._slide is None:
            with _OPENERS_LOCK:
                if self._slide is None:
                    self._slide = self._open()
        return self._slide

    def _open(self) -> Any:
        raise NotImplementedError

    def level_shapes(self, slide: Any) -> list[tuple[int, int]]:
        """``(height, width)`` of each level, finest first."""
        raise NotImplementedError

    def level_chunks(self, slide: Any, level: int) -> tuple[int, int]:
        """The file's tile (``(height, width)``) of ``level``: the unit in which its pixels are decoded."""
        raise NotImplementedError

    def properties(self, slide: Any) -> dict[str, Any]:
        return dict(slide.properties)

    def vendor(self, slide: Any) -> str | None:
        return None

    def read(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels ``[y0, y1) × [x0, x1)`` of ``level`` as ``(y, x, 3)`` uint8."""
        raise NotImplementedError


class _TiffSlideOpener(_Opener):
    name = "tiffslide"

    def _open(self) -> Any:
        import tiffslide

        try:
            slide = tiffslide.TiffSlide(self.source)
            self._axes = str(slide.properties["tiffslide.series-axes"])
        except (tiffslide.TiffFileError, NotImplementedError, ValueError, KeyError, IndexError) as error:
            raise _NotReadable(error) from error
        first = _level_array(slide.zarr_group, 0)
        self._check_pixels(first.dtype, first.shape)
        return slide

    def _check_pixels(self, dtype: Any, shape: tuple[int, ...]) -> None:
        samples = {"YXS": shape[-1], "CYX": shape[0], "YX": 1}.get(self._axes)
        if np.dtype(dtype) != np.uint8 or samples not in (1, 2, 3, 4):
            msg = (
                f"The slide {str(self.source)!r} has {np.dtype(dtype)} pixels with axes {self._axes} "
                f"(shape {tuple(shape)}); read_wsi reads 8-bit RGB, RGBA or grey brightfield scans. Convert it to "
                "8-bit RGB (e.g. a pyramidal OME-TIFF with bfconvert or vips)."
            )
            raise InputError(msg)

    def level_shapes(self, slide: Any) -> list[tuple[int, int]]:
        return [(int(h), int(w)) for w, h in slide.level_dimensions]

    def _array(self, level: int) -> Any:
        return _level_array(self.open().zarr_group, level)  # one zarr group per thread (cached by tiffslide)

    def level_chunks(self, slide: Any, level: int) -> tuple[int, int]:
        chunks = self._array(level).chunks
        return (int(chunks[1]), int(chunks[2])) if self._axes == "CYX" else (int(chunks[0]), int(chunks[1]))

    def vendor(self, slide: Any) -> str | None:
        vendor = slide.properties.get("tiffslide.vendor")
        if vendor is None and slide.ts_tifffile.is_ome:
            return "ome"
        return vendor

    def read(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        array = self._array(level)
        if self._axes == "CYX":
            block = np.moveaxis(np.asarray(array[:, y0:y1, x0:x1]), 0, -1)
        else:
            block = np.asarray(array[y0:y1, x0:x1])
        return _to_rgb(block)


class _OpenSlideOpener(_Opener):
    name = "openslide"

    def _open(self) -> Any:
        import openslide

        try:
            return openslide.OpenSlide(str(self.source))
        except (openslide.OpenSlideError, OSError) as error:
            msg = f"OpenSlide cannot read {str(self.source)!r} ({error}). Is it a whole-slide scan?"
            raise InputError(msg) from error

    def level_shapes(self, slide: Any) -> list[tuple[int, int]]:
        return [(int(h), int(w)) for w, h in slide.level_dimensions]

    def level_chunks(self, slide: Any, level: int) -> tuple[int, int]:
        props = slide.properties
        tile = (props.get(f"openslide.level[{level}].tile-height"), props.get(f"openslide.level[{level}].tile-width"))
        return (int(tile[0]), int(tile[1])) if None not in tile else (256, 256)

    def properties(self, slide: Any) -> dict[str, Any]:
        props = dict(slide.properties)
        for axis in ("x", "y"):
            props[f"tiffslide.mpp-{axis}"] = props.get(f"openslide.mpp-{axis}")
        return props

    def vendor(self, slide: Any) -> str | None:
        return slide.properties.get("openslide.vendor")

    def read(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        slide = self.open()
        downsample = float(slide.level_downsamples[level])
        location = (round(x0 * downsample), round(y0 * downsample))  # OpenSlide takes level-0 coordinates
        region = np.asarray(slide.read_region(location, level, (x1 - x0, y1 - y0)))
        if region.shape[-1] == 4:  # transparent = not scanned: composite onto white, the glass
            alpha = region[..., 3:].astype(np.uint16)
            rgb = (region[..., :3].astype(np.uint16) * alpha + 255 * (255 - alpha) + 127) // 255
            return rgb.astype(np.uint8)
        return _to_rgb(region)


def _level_array(group: Any, level: int) -> Any:
    """Level ``level`` of tiffslide's zarr group (a pyramid group, or a single array for a one-level file)."""
    return group[str(level)] if hasattr(group, "keys") and str(level) in group else group


def _to_rgb(block: np.ndarray) -> np.ndarray:
    """``(y, x)``, ``(y, x, 1|2|3|4)`` uint8 → ``(y, x, 3)`` (alpha dropped, grey repeated)."""
    if block.ndim == 2:
        block = block[:, :, None]
    if block.shape[2] in (1, 2):
        return np.repeat(block[:, :, :1], 3, axis=2)
    return block[:, :, :3]


# --------------------------------------------------------------------------- pixel size


def _recorded_um_per_px(opener: _Opener, slide: Any, source: Path) -> float:
    props = opener.properties(slide)
    sizes = (props.get("tiffslide.mpp-x"), props.get("tiffslide.mpp-y"))
    where = "the scan's metadata (tiffslide.mpp-x/-y)"
    if props.get("tiff.ResolutionUnit") == "INCH" and props.get("tiff.XResolution") in _DEFAULT_DPI:
        logger.info(
            "Ignoring the TIFF resolution of %s: %s dpi is a writer default.", source.name, props["tiff.XResolution"]
        )
        sizes = (None, None)
    if None in sizes and opener.name == "tiffslide":
        sizes, where = _ome_physical_size(slide), "the OME-XML (PhysicalSizeX/Y)"
    try:
        sx, sy = (float(v) for v in sizes)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        sx = sy = float("nan")
    if not (np.isfinite(sx) and np.isfinite(sy) and sx > 0 and sy > 0):
        msg = (
            f"The pixel size of {source.name!r} is not recorded in the file (no MPP in its metadata). Pass "
            "`um_per_px=` (micrometres per pixel of the full-resolution level; 0.25 for a 40× scan, 0.5 for 20× on "
            "most scanners, as stated by the scanner)."
        )
        raise InputError(msg)
    if abs(sx - sy) > 1e-3 * max(sx, sy):
        msg = (
            f"The pixels of {source.name!r} are not square ({sx:.6g} × {sy:.6g} µm per pixel in {where}); "
            "stpredict needs square pixels. Resample the scan, or pass `um_per_px=` if the metadata is wrong."
        )
        raise InputError(msg)
    return (sx + sy) / 2


def _ome_physical_size(slide: Any) -> tuple[float | None, float | None]:
    """``PhysicalSizeX/Y`` in µm of the first OME image, or ``(None, None)``."""
    import xml.etree.ElementTree as ET

    from ._metadata import _sizes_in_um

    xml = slide.ts_tifffile.ome_metadata if slide.ts_tifffile.is_ome else None
    if not xml:
        return None, None
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None, None
    pixels = next((e for e in root.iter() if e.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None or "PhysicalSizeX" not in pixels.attrib:
        return None, None
    sizes = _sizes_in_um(pixels.attrib, "PhysicalSizeX", "PhysicalSizeY", unit_suffix="Unit")
    return sizes if sizes is not None else (None, None)


# --------------------------------------------------------------------------- lazy levels


class _Level:
    """Array-like ``(y, x, 3)`` uint8 view of one level of a slide for :func:`dask.array.from_array`.

    Indexing reads the covered tiles from the file; nothing is read at construction. Picklable (the file is
    reopened in the process that reads), so the array can be computed on dask.distributed workers.
    """

    def __init__(self, opener: _Opener, index: int, shape: tuple[int, int]) -> None:
        self.opener = opener
        self.index = index
        self.shape = (shape[0], shape[1], 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3

    def __getitem__(self, key: Any) -> np.ndarray:
        ys, xs = key[0], key[1]
        y0, y1, _ = ys.indices(self.shape[0])
        x0, x1, _ = xs.indices(self.shape[1])
        block = self.opener.read(self.index, y0, y1, x0, x1) if y1 > y0 and x1 > x0 else np.empty((0, 0, 3), "u1")
        return block[:, :, key[2]] if len(key) > 2 else block


def _chunk_edge(tile: int, target: int, size: int) -> int:
    """A whole number of ``tile`` close to ``target`` (at least one tile), at most the level's ``size``."""
    tile = max(1, min(int(tile), size))
    return min(size, tile * max(1, round(target / tile)))


def _lazy(level: _Level, tile: tuple[int, int], chunk_px: int, source: Path) -> Any:
    """Level ``level`` as a dask ``(c, y, x)`` array whose chunks are whole multiples of the file's tiles."""
    import dask.array as da
    from dask.base import tokenize

    ny, nx = level.shape[:2]
    chunks = (_chunk_edge(tile[0], chunk_px, ny), _chunk_edge(tile[1], chunk_px, nx), 3)
    stat = source.stat()
    # named from the file's identity (path, size, mtime), not its content: tokenising would read the whole slide
    name = f"wsi-{tokenize(str(source), stat.st_size, stat.st_mtime_ns, level.opener.name, level.index, chunks)}"
    array = da.from_array(level, chunks=chunks, name=name, meta=np.empty((0, 0, 3), np.uint8), asarray=False)
    return array.transpose(2, 0, 1)


def _halve_block(block: np.ndarray) -> np.ndarray:
    ny, nx = block.shape[1] // 2, block.shape[2] // 2
    pairs = block[:, : 2 * ny, : 2 * nx].astype(np.uint16).reshape(block.shape[0], ny, 2, nx, 2)
    return (pairs.sum(axis=(2, 4)) >> 2).astype(np.uint8)


def _halve_lazy(array: Any, chunk_px: int) -> Any:
    """A lazy 2 × 2 block mean (truncated to uint8) of a ``(c, y, x)`` dask array; odd last rows/columns dropped."""
    ny, nx = (array.shape[1] // 2) * 2, (array.shape[2] // 2) * 2
    array = array[:, :ny, :nx]
    even = tuple(tuple(c + (c % 2) for c in axis) for axis in array.chunks[1:])
    even = tuple(_fit(axis, size) for axis, size in zip(even, (ny, nx), strict=True))
    array = array.rechunk((3, *even))
    half = array.map_blocks(
        _halve_block, dtype=np.uint8, chunks=(3, tuple(c // 2 for c in even[0]), tuple(c // 2 for c in even[1]))
    )
    target = max(2, chunk_px)
    return half.rechunk((3, min(target, half.shape[1]), min(target, half.shape[2])))


def _fit(chunks: tuple[int, ...], size: int) -> tuple[int, ...]:
    """Even chunk lengths that sum to ``size`` (itself even): the last one shortened."""
    out, total = [], 0
    for c in chunks:
        c = min(c, size - total)
        if c <= 0:
            break
        out.append(c)
        total += c
    return tuple(out)


def _downsample(level0: Any, level: Any) -> float:
    """The level's downsample as spatialdata's transformation has it: mean of ``shape0 / shape`` over y and x."""
    return float((level0.shape[1] / level.shape[1] + level0.shape[2] / level.shape[2]) / 2)


def _multiscale(arrays: list[Any]) -> Any:
    """A validated multiscale Image2DModel DataTree (``scale0``, ``scale1``, …) of ``(c, y, x)`` dask arrays."""
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity, set_transformation
    from xarray import DataArray, Dataset, DataTree

    levels = {
        f"scale{i}": Dataset({"image": DataArray(a, dims=("c", "y", "x"), coords={"c": ["r", "g", "b"]})})
        for i, a in enumerate(arrays)
    }
    tree = DataTree.from_dict(levels)
    # spatialdata sets each level's transformation to Scale(shape0 / shape_i) composed with these
    set_transformation(tree, {GLOBAL_CS: Identity()}, set_all=True)
    Image2DModel().validate(tree)
    if math.prod(arrays[0].shape[1:]) == 0:
        msg = "The slide has no pixels (a level of size 0); the file is damaged."
        raise InputError(msg)
    return tree
