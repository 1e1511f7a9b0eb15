"""Tissue mask of an H&E image, computed on a coarse pyramid level."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from stpredict._elements import add_elements, check_new_elements
from stpredict._errors import InputError
from stpredict._geometry import raster_shape, scale_levels, um_per_px
from stpredict._keys import Attrs, Keys
from stpredict._logging import get_logger
from stpredict._meta import set_element_meta

if TYPE_CHECKING:
    from spatialdata import SpatialData
    from xarray import DataArray

__all__ = ["tissue_mask"]

logger = get_logger(__name__)

#: Pixels whose brightest channel is below this (of 255) are background, for scans with a black mask.
_DARK_VALUE = 30.0


def _pick_level(element: Any, full_um: float, target_um: float) -> tuple[DataArray, float, float]:
    """The coarsest level at least as fine as ``target_um`` (or the finest level), with its y and x factors."""
    ny0, nx0 = raster_shape(element)
    best = None
    for level in scale_levels(element):
        fy, fx = ny0 / level.sizes["y"], nx0 / level.sizes["x"]
        if best is None or full_um * max(fy, fx) <= target_um * (1 + 1e-6):
            best = (level, fy, fx)
    return best


def _saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation of a ``(3, y, x)`` float image, with near-black pixels set to 0."""
    vmax = rgb.max(axis=0)
    vmin = rgb.min(axis=0)
    sat = np.where(vmax > 0, (vmax - vmin) / np.maximum(vmax, 1e-6), 0.0)
    sat[vmax < _DARK_VALUE] = 0.0
    return sat.astype(np.float32)


def tissue_mask(
    sdata: SpatialData,
    image_key: str = Keys.image,
    *,
    target_um_per_px: float = 8.0,
    method: Literal["otsu", "fixed"] = "otsu",
    threshold: float | None = None,
    min_area_um2: float = 10_000.0,
    key_added: str | None = None,
    overwrite: bool = False,
    inplace: bool = True,
) -> DataArray | None:
    """Segment tissue from background in an H&E image.

    The image is read at the coarsest pyramid level that is at least as fine as ``target_um_per_px`` and
    block-averaged down to about that pixel size, so the cost does not grow with the slide's resolution.
    Each pixel's tissue score is its HSV saturation: stained tissue is pink or purple, and both a white glass
    background and a black-masked background (pixels darker than 30/255 count as background) score near 0.
    The score is smoothed, thresholded (Otsu's threshold, or a fixed one), closed, holes are filled, and
    connected components smaller than ``min_area_um2`` are removed.

    Parameters
    ----------
    sdata
        The SpatialData holding the image; the image must be calibrated (:func:`stpredict.pp.calibrate`).
    image_key
        Key of the RGB image (``c = r, g, b``).
    target_um_per_px
        Pixel size of the mask in µm (approximate: the nearest integer down-sampling of a pyramid level).
    method
        ``"otsu"``: Otsu's threshold on the saturation histogram; ``"fixed"``: ``threshold``.
    threshold
        Saturation threshold in [0, 1] for ``method="fixed"`` (default 0.1); ignored by ``"otsu"``.
    min_area_um2
        Connected tissue pieces smaller than this area (µm²) are dropped.
    key_added
        Key of the labels element; default ``Keys.tissue_mask(image_key)`` (``"he_tissue"``).
    overwrite
        Replace an existing labels element ``key_added``. Without it, a call whose key exists raises before any
        work; an element of another type is never replaced.
    inplace
        Write ``sdata.labels[key_added]``; with ``False`` return the labels element instead (and write or check
        nothing).

    Returns
    -------
    ``None``, or with ``inplace=False`` the labels element: ``uint8`` (1 = tissue, 0 = background),
    ``dims = (y, x)``, transformations = the image's, each preceded by ``Scale`` of the down-sampling factor.
    Its ``attrs["stpredict"]`` records ``image_key``, ``method``, ``threshold``, ``um_per_px``,
    ``downsample`` and ``tissue_fraction``.

    Raises
    ------
    CalibrationError
        If the image's µm per pixel is unknown.
    InputError
        If no tissue is found, or (with ``inplace``) ``key_added`` exists without ``overwrite`` or names an element
        of another type.
    """
    from scipy import ndimage
    from skimage.filters import threshold_otsu
    from spatialdata.models import Labels2DModel
    from spatialdata.transformations import Scale, Sequence, get_transformation

    if image_key not in sdata.images:
        msg = f"No image {image_key!r} in the SpatialData; available images: {sorted(sdata.images)}."
        raise KeyError(msg)
    if method not in ("otsu", "fixed"):
        msg = f"method must be 'otsu' or 'fixed', got {method!r}."
        raise InputError(msg)
    if target_um_per_px <= 0 or min_area_um2 < 0:
        msg = "target_um_per_px must be positive and min_area_um2 non-negative."
        raise InputError(msg)
    key = key_added or Keys.tissue_mask(image_key)
    if inplace:  # before any work
        check_new_elements(sdata, {key: "labels"}, overwrite=overwrite)
    image = sdata.images[image_key]
    full_um = um_per_px(sdata, image_key)
    level, fy, fx = _pick_level(image, full_um, target_um_per_px)
    if level.sizes["c"] < 3:
        msg = f"Image {image_key!r} has {level.sizes['c']} channels; a tissue mask needs an RGB H&E image."
        raise InputError(msg)
    extra = max(1, int(target_um_per_px // (full_um * max(fy, fx))))
    rgb = level.isel(c=slice(0, 3)).astype(np.float32)
    if extra > 1:
        rgb = rgb.coarsen(y=extra, x=extra, boundary="pad").mean()
    rgb = np.asarray(rgb.data.compute() if hasattr(rgb.data, "compute") else rgb.data)
    if np.issubdtype(level.dtype, np.floating) and np.nanmax(rgb, initial=0.0) <= 1:  # float RGB in [0, 1]
        rgb = rgb * np.float32(255)  # the dark-pixel cutoff is in [0, 255]
    fy, fx = fy * extra, fx * extra
    mask_um = full_um * max(fy, fx)

    score = ndimage.gaussian_filter(_saturation(rgb), sigma=1.0)
    if method == "otsu":
        thr = float(threshold_otsu(score)) if np.ptp(score) > 0 else np.inf
    else:
        thr = 0.1 if threshold is None else float(threshold)
    mask = score > thr
    mask = ndimage.binary_closing(mask, structure=np.ones((3, 3), bool), iterations=1, border_value=0)
    mask = ndimage.binary_fill_holes(mask)
    labels, n = ndimage.label(mask)
    if n:
        sizes = np.bincount(labels.ravel())
        keep = sizes * (full_um**2 * fy * fx) >= min_area_um2
        keep[0] = False
        mask = keep[labels]
    if not mask.any():
        msg = (
            f"No tissue found in image {image_key!r} (threshold {thr:.3g} on saturation, pieces ≥ "
            f"{min_area_um2:g} µm²). Check that the image is an RGB H&E image and that its µm per pixel is "
            "right, or lower the threshold: `method='fixed', threshold=0.05`, or a smaller `min_area_um2`."
        )
        raise InputError(msg)

    scale = Scale([fy, fx], axes=("y", "x"))
    transformations = {cs: Sequence([scale, t]) for cs, t in get_transformation(image, get_all=True).items()}
    labels_el = Labels2DModel.parse(mask.astype(np.uint8), dims=("y", "x"), transformations=transformations)
    meta = {
        "kind": "tissue_mask",
        "image_key": image_key,
        "method": method,
        "threshold": float(thr),
        "um_per_px": float(mask_um),
        "downsample": [float(fy), float(fx)],
        "tissue_fraction": float(mask.mean()),
    }
    logger.info("Tissue mask of %r: %.1f%% tissue at %.3g µm/px.", image_key, 100 * mask.mean(), mask_um)
    if not inplace:
        labels_el.attrs[Attrs.root] = meta
        return labels_el
    add_elements(sdata, {key: ("labels", labels_el)})
    set_element_meta(sdata, key, labels_el, meta)
    return None
