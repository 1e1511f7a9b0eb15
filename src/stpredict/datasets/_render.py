"""Rendering of the synthetic section: the H&E image, cells per truth pixel, the truth density and tissue rasters.

Each ``_render_*`` function computes one window of a raster from the section and the cells near the window
(from global coordinates only, so a window equals the same pixels of a larger rendering); :func:`_lazy_raster`
assembles such windows into a dask array, chunk by chunk.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from . import _kernels as K
from ._cells import _Cells, _cells_near
from ._section import _EDGE, _F_BASIS, _F_STAIN, _LATTICE_UM, _N_BASIS, _lattice, _Section

_H_OD = np.array([0.65, 0.70, 0.29])  # haematoxylin optical density per unit concentration (Ruifrok & Johnston)
_E_OD = np.array([0.10, 0.80, 0.35])  # eosin, tuned to a pink
_STROMA_E = 0.22


@functools.cache
def _lut() -> np.ndarray:
    return K.stain_lut(_H_OD, _E_OD)


def _render_image(sec: _Section, y0: int, x0: int, h: int, w: int, cells: _Cells | None = None) -> np.ndarray:
    """uint8 RGB ``(3, h, w)`` of image pixels ``[y0, y0+h) × [x0, x0+w)``."""
    px = sec.um_per_px
    c = cells if cells is not None else _cells_near(sec, x0 * px, (x0 + w) * px, y0 * px, (y0 + h) * px)
    lat, lx0, ly0 = _lattice(sec, y0, x0, h, w, px, [_F_STAIN])
    level, stain = K.interp_lattice(lat, lx0, ly0, _LATTICE_UM, y0, x0, h, w, px)
    hema = np.zeros((h, w), dtype=np.float32)
    eosin = np.zeros((h, w), dtype=np.float32)
    membrane = np.zeros((h, w), dtype=np.float32)
    vacuole = np.zeros((h, w), dtype=np.float32)
    soft = max(0.35, 0.6 * px)
    zeros = np.zeros(c.x.size)
    seed = sec.seed
    # Cytoplasm (eosin), adipocyte vacuoles and membranes, fibres, then nuclei.
    solid = c.vacuole == 0
    r = c.cyto_r
    K.stamp_ellipses(eosin, y0, x0, px, c.x[solid], c.y[solid], r[solid], r[solid], zeros[solid],
                     c.cyto_e[solid], zeros[solid], zeros[solid], c.ids[solid], 1.0, 1, seed)  # fmt: skip
    vac = ~solid
    ones = np.ones(int(vac.sum()))
    K.stamp_ellipses(vacuole, y0, x0, px, c.x[vac], c.y[vac], r[vac] - 0.8, r[vac] - 0.8, zeros[vac],
                     0.97 * ones, zeros[vac], zeros[vac], c.ids[vac], 0.5, 1, seed)  # fmt: skip
    K.stamp_ellipses(membrane, y0, x0, px, c.x[vac], c.y[vac], r[vac], r[vac], zeros[vac],
                     0.35 * ones, zeros[vac], zeros[vac], c.ids[vac], 0.6, 2, seed)  # fmt: skip
    fz = np.zeros(c.fx.size)
    K.stamp_ellipses(eosin, y0, x0, px, c.fx, c.fy, c.fa, c.fb, c.ftheta, c.fval, fz, fz, c.fids, soft, 0, seed)
    K.stamp_ellipses(hema, y0, x0, px, c.nx, c.ny, c.a, c.b, c.theta, c.hema, c.rim, c.texture, c.ids,
                     soft, 0, seed + 1)  # fmt: skip
    return K.compose_rgb(hema, eosin, membrane, vacuole, level, stain, _lut(), _STROMA_E, _EDGE, y0, x0, sec.seed)


def _render_cells_per_px(sec: _Section, y0: int, x0: int, h: int, w: int, cells: _Cells | None = None) -> np.ndarray:
    """Expected number of cells of each type per truth pixel ``(T, h, w)`` (float64)."""
    px = sec.truth_um_per_px
    c = cells if cells is not None else _cells_near(sec, x0 * px, (x0 + w) * px, y0 * px, (y0 + h) * px)
    out = np.zeros((len(sec.type_names), h, w))
    K.render_footprints(out, y0, x0, px, c.x, c.y, c.sigma, c.kind)
    return out


def _render_truth_window(
    sec: _Section, y0: int, x0: int, h: int, w: int, cells_per_px: np.ndarray | None = None
) -> np.ndarray:
    """Expected counts per µm² ``(G, h, w)`` float32 of truth pixels ``[y0, y0+h) × [x0, x0+w)``."""
    px = sec.truth_um_per_px
    if cells_per_px is None:
        cells_per_px = _render_cells_per_px(sec, y0, x0, h, w)
    lat, lx0, ly0 = _lattice(sec, y0, x0, h, w, px, list(range(_F_BASIS, _F_BASIS + _N_BASIS)))
    shape = lat.shape[1:]
    flat = lat.reshape(lat.shape[0], -1)
    mod = K.gene_modulation(flat[0], np.ascontiguousarray(flat[1:]), sec.loadings, sec.beta, sec.gain)
    mod = mod.reshape(-1, *shape)
    return K.mix_density(
        cells_per_px, mod, lx0, ly0, _LATTICE_UM, y0, x0, px, sec.profiles, sec.morph, sec.baseline, _EDGE
    )


def _render_tissue_window(sec: _Section, y0: int, x0: int, h: int, w: int, px_um: float) -> np.ndarray:
    """Tissue fraction in [0, 1] at the pixel centres of a raster with ``px_um`` µm pixels ``(h, w)`` float32."""
    lat, lx0, ly0 = _lattice(sec, y0, x0, h, w, px_um, [])
    level = K.interp_lattice(lat, lx0, ly0, _LATTICE_UM, y0, x0, h, w, px_um)[0]
    return np.clip(0.5 + level / _EDGE, 0.0, 1.0).astype(np.float32)


def _render_labels(sec: _Section, cells: _Cells | None = None) -> tuple[np.ndarray, _Cells]:
    """Cell territories at the image resolution (uint32, 0 = background) and the cells."""
    px = sec.um_per_px
    c = cells if cells is not None else _cells_near(sec, 0.0, sec.width_um, 0.0, sec.height_um)
    labels = np.zeros((sec.ny, sec.nx), dtype=np.uint32)
    best = np.full((sec.ny, sec.nx), np.inf, dtype=np.float32)
    K.render_territories(labels, best, 0, 0, px, c.x, c.y, c.cyto_r, c.ids)
    return labels, c


def _lazy_raster(render: Any, n_ch: int, ny: int, nx: int, chunk: int, dtype: Any) -> Any:
    import dask
    import dask.array as da

    rows = []
    for y0 in range(0, ny, chunk):
        h = min(chunk, ny - y0)
        row = []
        for x0 in range(0, nx, chunk):
            w = min(chunk, nx - x0)
            block = dask.delayed(render, pure=True)(y0, x0, h, w)
            row.append(da.from_delayed(block, shape=(n_ch, h, w), dtype=dtype))
        rows.append(row)
    return da.block(rows)
