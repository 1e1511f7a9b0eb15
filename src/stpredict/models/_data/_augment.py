"""Augmentation of training tiles: flips and 90° rotations of an image with its footprints, and stain jitter.

Flips and 90° rotations are applied to the image and the footprints together; colour augmentation perturbs the
haematoxylin/eosin/DAB stain space. Both take their random draws from the caller's generator.
"""

from __future__ import annotations

import numpy as np

__all__ = ["augment_geometry", "hed_jitter"]


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
