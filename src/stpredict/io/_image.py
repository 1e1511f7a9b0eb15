"""Decode H&E image files into RGB uint8 arrays and wrap them as chunked, multiscale SpatialData images.

Decoding reads the whole file once into memory (JPEG and PNG are not tile-addressable, so a lazy reader would
decode the file again for every chunk), then wraps it in dask. The pyramid levels are computed once, eagerly,
by 2 × 2 block means with numpy, the same values as spatialdata's default (``xarray`` coarsen-mean, truncated
to uint8), but about ten times faster than computing the lazy coarsen graph on first access.

Whole-slide scans exceed PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``, 89.5 Mpx): her2st
C2–C5 are 9274 × 9911 px. JPEG and PNG files are decoded with ``imagecodecs`` (a dependency of spatialdata-io),
which has no such limit; every other format goes through PIL with the limit lifted only for the duration of
the call, under a lock, and restored afterwards, so the reader leaves no global side effect.
"""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stpredict._errors import InputError
from stpredict._logging import get_logger

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping, Sequence

__all__ = ["build_image", "decode_image", "default_scale_factors", "image_size", "to_rgb_uint8"]

logger = get_logger(__name__)

_PIL_LOCK = threading.Lock()
#: The coarsest pyramid level is at most this many pixels along its longer side.
COARSEST_LEVEL_PX = 1024
_JPEG_SUFFIXES = {".jpg", ".jpeg"}
_JPEG_EOI = b"\xff\xd9"
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".btf", ".bmp", ".webp"}


@contextmanager
def _pil_reading_whole_slides() -> Iterator[Any]:
    """PIL with the decompression-bomb limit lifted and truncated files refused, restored on exit."""
    from PIL import Image, ImageFile

    with _PIL_LOCK:
        old_max, old_truncated = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
        Image.MAX_IMAGE_PIXELS = None
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            yield Image
        finally:
            Image.MAX_IMAGE_PIXELS = old_max
            ImageFile.LOAD_TRUNCATED_IMAGES = old_truncated


def _unreadable(path: Path, reason: object) -> InputError:
    msg = (
        f"The image file {str(path)!r} cannot be decoded ({reason}). It is unreadable or truncated: copy or "
        "download it again, or re-export it as PNG/JPEG/TIFF."
    )
    return InputError(msg)


def _existing_file(path: str | Path) -> Path:
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        images = sorted(p.name for p in path.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        msg = f"{str(path)!r} is a folder, not an image file. Pass the H&E image file inside it (images: {images})."
    else:
        msg = f"Image file {str(path)!r} does not exist. Pass the path of the H&E image."
    raise InputError(msg)


def image_size(path: str | Path) -> tuple[int, int]:
    """``(height, width)`` of an image file from its header, without decoding the pixels.

    Raises
    ------
    InputError
        If the file is missing or not an image.
    """
    path = _existing_file(path)
    with _pil_reading_whole_slides() as image_module:
        try:
            with image_module.open(path) as image:
                width, height = image.size
        except (OSError, SyntaxError, ValueError) as error:
            raise _unreadable(path, error) from error
    return int(height), int(width)


def decode_image(path: str | Path) -> np.ndarray:
    """Decode an image file into an ``(y, x, 3)`` RGB uint8 array (alpha dropped, grey expanded).

    Parameters
    ----------
    path
        PNG, JPEG, TIFF or any format PIL reads.

    Returns
    -------
    The image, channels last.

    Raises
    ------
    InputError
        If the file is missing, unreadable, truncated, or not an 8-bit image.
    """
    import imagecodecs

    path = _existing_file(path)
    suffix = path.suffix.lower()
    data = path.read_bytes()
    array: np.ndarray | None = None
    try:
        # JPEG decoders pad a truncated scan with grey without complaint: only files that end with the
        # end-of-image marker take the fast path; PIL, which refuses truncated files, judges the rest.
        if suffix in _JPEG_SUFFIXES and data.rstrip(b"\x00\r\n ").endswith(_JPEG_EOI):
            array = imagecodecs.jpeg8_decode(data)
        elif suffix == ".png":
            array = imagecodecs.png_decode(data)
    except Exception as error:  # imagecodecs raises codec-specific classes; all mean "unreadable"
        if suffix == ".png":
            raise _unreadable(path, error) from error
        array = None  # a JPEG libjpeg cannot read (e.g. CMYK, arithmetic coding): let PIL try
    del data
    if array is None or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        array = _decode_with_pil(path)
    return to_rgb_uint8(array, name=str(path))


def _decode_with_pil(path: Path) -> np.ndarray:
    with _pil_reading_whole_slides() as image_module:
        try:
            with image_module.open(path) as image:
                image.load()
                mode = image.mode
                if mode in {"I", "I;16", "I;16B", "I;16L", "F"}:
                    msg = (
                        f"The image {str(path)!r} has {mode!r} pixels (more than 8 bits); an 8-bit RGB H&E image is "
                        "needed. Convert it to 8-bit RGB first."
                    )
                    raise InputError(msg)
                if mode != "RGB":
                    image = image.convert("RGB")  # alpha dropped, palette and grey expanded
                return np.asarray(image)
        except InputError:
            raise
        except (OSError, SyntaxError, ValueError) as error:
            raise _unreadable(path, error) from error


def to_rgb_uint8(array: Any, *, name: str = "image") -> np.ndarray:
    """``(y, x)`` grey, ``(y, x, 3)`` RGB or ``(y, x, 4)`` RGBA uint8 → ``(y, x, 3)`` RGB uint8 (no copy if RGB)."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        msg = f"{name} has dtype {array.dtype}; an 8-bit RGB H&E image is needed. Convert it, e.g. to uint8 RGB."
        raise InputError(msg)
    if array.ndim == 2:
        logger.info("%s is greyscale; its single channel is repeated as R, G and B.", name)
        return np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4):
        msg = f"{name} has shape {array.shape}; expected (y, x), (y, x, 3) or (y, x, 4)."
        raise InputError(msg)
    if array.shape[2] in (1, 2):  # grey (+ alpha)
        return np.repeat(array[:, :, :1], 3, axis=2)
    return array[:, :, :3]


def default_scale_factors(shape: tuple[int, int]) -> list[int]:
    """Factors of 2 until the longer side is at most :data:`COARSEST_LEVEL_PX` (at least one level, if > 1 px)."""
    longest, shortest = max(shape), min(shape)
    n = max(1, math.ceil(math.log2(max(longest, 1) / COARSEST_LEVEL_PX)))
    n = min(n, int(math.floor(math.log2(max(shortest, 1)))))
    return [2] * max(n, 0)


def _trim_start(array: np.ndarray, factor: int) -> np.ndarray:
    """Drop leading rows/columns so both sides divide by ``factor`` (xarray ``coarsen(side="right")``)."""
    return array[array.shape[0] % factor :, array.shape[1] % factor :]


def _halve(array: np.ndarray, rows_per_block: int = 256) -> np.ndarray:
    """2 × 2 block mean of a ``(y, x, c)`` uint8 array, truncated like spatialdata's coarsen-mean.

    Processed in bands of rows, which keeps the uint16 temporaries in cache (3× faster than one pass).
    """
    array = _trim_start(array, 2)
    ny, nx, nc = array.shape[0] // 2, array.shape[1] // 2, array.shape[2]
    out = np.empty((ny, nx, nc), dtype=np.uint8)
    for start in range(0, ny, rows_per_block):
        stop = min(ny, start + rows_per_block)
        band = array[2 * start : 2 * stop]
        pairs = band[0::2].astype(np.uint16)
        pairs += band[1::2]
        pairs = pairs.reshape(stop - start, nx, 2, nc)
        total = pairs[:, :, 0] + pairs[:, :, 1]
        total >>= 2
        out[start:stop] = total
    return out


def _downscale(array: np.ndarray, factor: int) -> np.ndarray:
    if factor == 2:
        return _halve(array)
    array = _trim_start(array, factor)
    ny, nx = array.shape[0] // factor, array.shape[1] // factor
    blocks = array.reshape(ny, factor, nx, factor, array.shape[2])
    return (blocks.sum(axis=(1, 3), dtype=np.uint32) // (factor * factor)).astype(np.uint8)


class _InMemory:
    """Array-like view of a numpy array for :func:`dask.array.from_array`.

    ``from_array`` copies numpy inputs whole (dask ≥ 2025); this wrapper has no ``copy`` method, so the chunks
    stay views into the one decoded array and memory stays at one copy of the image.
    """

    def __init__(self, array: np.ndarray) -> None:
        self._array = array
        self.shape = array.shape
        self.dtype = array.dtype
        self.ndim = array.ndim

    def __getitem__(self, key: Any) -> np.ndarray:
        return self._array[key]


def _wrap(array: np.ndarray, chunks: int, name: str) -> Any:
    import dask.array as da

    array.flags.writeable = False  # the dask graph reads this buffer: nobody may change it underneath
    return da.from_array(_InMemory(array), chunks=(chunks, chunks, array.shape[2]), name=name, meta=array[:0, :0])


def build_image(
    array_yxc: np.ndarray,
    *,
    transformations: Mapping[str, Any],
    scale_factors: Sequence[int] | None = None,
    chunks: int = 1024,
    name: str = "he",
) -> Any:
    """Wrap an in-memory ``(y, x, 3)`` uint8 array as an Image2DModel element (c = r, g, b), multiscale.

    Parameters
    ----------
    array_yxc
        RGB image, channels last (kept in memory, not copied).
    transformations
        Transformations of the full-resolution level (e.g. ``{"global": Identity()}``).
    scale_factors
        Downscaling factors between pyramid levels; ``None`` picks factors of 2 until the coarsest level is at
        most 1024 px; an empty sequence gives a single-scale element.
    chunks
        Chunk edge along ``y`` and ``x`` in pixels.
    name
        Used in the dask graph key, for readability.

    Returns
    -------
    :class:`xarray.DataTree` (or :class:`xarray.DataArray` when ``scale_factors`` is empty).
    """
    from spatialdata.models import Image2DModel

    shape = (int(array_yxc.shape[0]), int(array_yxc.shape[1]))
    factors = default_scale_factors(shape) if scale_factors is None else [int(f) for f in scale_factors]
    token = f"{name}-{id(array_yxc):x}-{shape[0]}x{shape[1]}"
    # Named explicitly so that dask does not hash the whole array to tokenise it.
    lazy = _wrap(array_yxc, chunks, f"image-{token}")
    element = Image2DModel.parse(
        lazy,
        dims=("y", "x", "c"),
        c_coords=["r", "g", "b"],
        transformations=dict(transformations),
        scale_factors=factors or None,
        chunks=(3, chunks, chunks),
    )
    if not factors:
        return element
    level = array_yxc
    for i, factor in enumerate(factors, start=1):
        level = _downscale(level, factor)
        node = element[f"scale{i}"]
        (var,) = node.data_vars
        expected = node[var].shape
        assert expected == (3, level.shape[0], level.shape[1]), (expected, level.shape)
        eager = _wrap(level, chunks, f"image-{token}-scale{i}").transpose(2, 0, 1)
        dataset = node.to_dataset()
        dataset[var] = dataset[var].copy(data=eager)
        element[f"scale{i}"] = dataset
    Image2DModel.validate(element)
    return element
