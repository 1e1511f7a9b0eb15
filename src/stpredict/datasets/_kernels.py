"""Numba kernels of the synthetic tissue: random fields, stamping cells, rendering and integrating footprints.

Every kernel computes a pixel from global coordinates only (never from its position inside a window), in the
same floating-point order whatever the window, so a window rendered alone equals the same pixels of a larger
rendering bit for bit. That is what makes chunk-by-chunk (dask) generation identical to eager generation.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

__all__ = [
    "compose_rgb",
    "eval_fields",
    "gene_modulation",
    "hash01",
    "integrate_circles",
    "integrate_labels",
    "integrate_squares",
    "interp_lattice",
    "mix_density",
    "render_footprints",
    "render_territories",
    "stain_lut",
    "stamp_ellipses",
]

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_G = np.uint64(0x9E3779B97F4A7C15)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)
_S11 = np.uint64(11)
_INV53 = 1.0 / 9007199254740992.0


@njit(cache=True, nogil=True)
def hash01(seed: int, a: int, b: int) -> float:
    """A uniform number in [0, 1) from three integers (splitmix64 finaliser)."""
    z = np.uint64(seed) * _G + np.uint64(a) * _M1 + np.uint64(b) * _M2 + _G
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    z = z ^ (z >> _S31)
    return float(z >> _S11) * _INV53


@njit(cache=True, nogil=True)
def eval_fields(x: np.ndarray, y: np.ndarray, omega: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """Random Fourier fields at points: ``out[f, n] = sqrt(2/M) Σ_m cos(ω_fm · (x_n, y_n) + φ_fm)`` (unit variance)."""
    n_fields, n_modes = phase.shape
    amp = math.sqrt(2.0 / n_modes)
    out = np.empty((n_fields, x.size), dtype=np.float64)
    for f in range(n_fields):
        for n in range(x.size):
            acc = 0.0
            for m in range(n_modes):
                acc += math.cos(omega[f, m, 0] * x[n] + omega[f, m, 1] * y[n] + phase[f, m])
            out[f, n] = amp * acc
    return out


@njit(cache=True, nogil=True)
def _lattice_coord(p: int, l0: int, spacing: float, px_um: float) -> tuple[int, float]:
    """Where the centre of global pixel ``p`` falls on a lattice axis: (cell index from ``l0``, fraction in the cell).

    Pixel centres sit at µm ``(p + 0.5)·px_um``, lattice points at ``(l0 + k)·spacing``; the shared first step of
    the bilinear interpolations of :func:`interp_lattice` and :func:`mix_density`.
    """
    t = (p + 0.5) * px_um / spacing
    k = int(math.floor(t))
    return k - l0, t - k


@njit(cache=True, nogil=True)
def interp_lattice(
    values: np.ndarray, lx0: int, ly0: int, spacing: float, y0: int, x0: int, h: int, w: int, px_um: float
) -> np.ndarray:
    """Bilinear interpolation of lattice values ``(F, ny, nx)`` to pixel centres.

    Lattice point ``(k, l)`` sits at µm ``((lx0 + l)·spacing, (ly0 + k)·spacing)``; the output covers pixels
    ``[y0, y0+h) × [x0, x0+w)`` of a raster with ``px_um`` µm pixels.
    """
    n_fields = values.shape[0]
    out = np.empty((n_fields, h, w), dtype=np.float32)
    for i in range(h):
        ky, fy = _lattice_coord(y0 + i, ly0, spacing, px_um)
        for j in range(w):
            kx, fx = _lattice_coord(x0 + j, lx0, spacing, px_um)
            for f in range(n_fields):
                v00 = values[f, ky, kx]
                v01 = values[f, ky, kx + 1]
                v10 = values[f, ky + 1, kx]
                v11 = values[f, ky + 1, kx + 1]
                out[f, i, j] = (v00 * (1.0 - fx) + v01 * fx) * (1.0 - fy) + (v10 * (1.0 - fx) + v11 * fx) * fy
    return out


@njit(cache=True, nogil=True)
def stamp_ellipses(
    out: np.ndarray,
    y0: int,
    x0: int,
    px_um: float,
    cx: np.ndarray,
    cy: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    theta: np.ndarray,
    value: np.ndarray,
    rim: np.ndarray,
    texture: np.ndarray,
    ids: np.ndarray,
    soft_um: float,
    mode: int,
    seed: int,
) -> None:
    """Stamp ellipses (µm) into window ``out`` (pixels ``[y0, y0+h) × [x0, x0+w)``).

    ``mode`` 0 adds a filled ellipse, 1 takes the maximum with a filled ellipse, 2 adds a ring on the outline.
    The profile inside is ``value · (1 + rim · (d² − 0.5)) · (1 + texture · (u − 0.5))`` with ``d`` the elliptic
    radius and ``u`` a hash of the global pixel and the ellipse id (chromatin grain).
    """
    h, w = out.shape
    for c in range(cx.size):
        ct, st = math.cos(theta[c]), math.sin(theta[c])
        ea, eb = a[c], b[c]
        hx = math.sqrt(ea * ea * ct * ct + eb * eb * st * st) + 2.0 * soft_um
        hy = math.sqrt(ea * ea * st * st + eb * eb * ct * ct) + 2.0 * soft_um
        j0 = max(int(math.floor((cx[c] - hx) / px_um)) - x0, 0)
        j1 = min(int(math.ceil((cx[c] + hx) / px_um)) - x0, w)
        i0 = max(int(math.floor((cy[c] - hy) / px_um)) - y0, 0)
        i1 = min(int(math.ceil((cy[c] + hy) / px_um)) - y0, h)
        inner = min(ea, eb)
        for i in range(i0, i1):
            dy = (y0 + i + 0.5) * px_um - cy[c]
            for j in range(j0, j1):
                dx = (x0 + j + 0.5) * px_um - cx[c]
                u = dx * ct + dy * st
                v = -dx * st + dy * ct
                d = math.sqrt((u / ea) ** 2 + (v / eb) ** 2)
                if mode == 2:
                    t = (d - 1.0) * inner / soft_um
                    if t * t > 9.0:
                        continue
                    out[i, j] += value[c] * math.exp(-t * t)
                    continue
                edge = (1.0 - d) * inner / soft_um + 0.5
                if edge <= 0.0:
                    continue
                edge = min(edge, 1.0)
                val = value[c] * edge * (1.0 + rim[c] * (d * d - 0.5))
                if texture[c] != 0.0:
                    val *= 1.0 + texture[c] * (hash01(seed, ids[c], (y0 + i) * 1000003 + (x0 + j)) - 0.5)
                if mode == 0:
                    out[i, j] += val
                elif val > out[i, j]:
                    out[i, j] = val


_LUT_H_MAX, _LUT_E_MAX, _LUT_NH, _LUT_NE = 4.0, 2.0, 512, 256


def stain_lut(h_od: np.ndarray, e_od: np.ndarray) -> np.ndarray:
    """Intensity ``255 · 10^-(0.012 + h·h_od + e·e_od)`` on a grid of concentrations ``(3, NH + 1, NE + 1)``."""
    h = np.linspace(0.0, _LUT_H_MAX, _LUT_NH + 1)[:, None, None]
    e = np.linspace(0.0, _LUT_E_MAX, _LUT_NE + 1)[None, :, None]
    od = 0.012 + h * np.asarray(h_od)[None, None] + e * np.asarray(e_od)[None, None]
    return np.ascontiguousarray((255.0 * 10.0 ** (-od)).transpose(2, 0, 1))


@njit(cache=True, nogil=True)
def compose_rgb(
    hema: np.ndarray,
    eosin: np.ndarray,
    membrane: np.ndarray,
    vacuole: np.ndarray,
    level: np.ndarray,
    stain: np.ndarray,
    lut: np.ndarray,
    stroma_e: float,
    edge: float,
    y0: int,
    x0: int,
    seed: int,
) -> np.ndarray:
    """Beer–Lambert composition of haematoxylin and eosin concentrations into uint8 RGB ``(3, h, w)``.

    ``lut`` is :func:`stain_lut` (bilinear interpolation error below 0.01 intensity levels).
    """
    h, w = hema.shape
    out = np.empty((3, h, w), dtype=np.uint8)
    sh = _LUT_NH / _LUT_H_MAX
    se = _LUT_NE / _LUT_E_MAX
    for i in range(h):
        for j in range(w):
            t = min(max(0.5 + level[i, j] / edge, 0.0), 1.0)
            s = 1.0 + 0.25 * stain[i, j]
            e_conc = ((stroma_e + eosin[i, j]) * (1.0 - vacuole[i, j]) + membrane[i, j]) * t * s
            h_conc = (hema[i, j] + 0.03) * t * s
            noise = 5.0 * (hash01(seed, 17, (y0 + i) * 1000003 + (x0 + j)) - 0.5) + 0.5
            hh = min(max(h_conc * sh, 0.0), _LUT_NH - 1e-9)
            ee = min(max(e_conc * se, 0.0), _LUT_NE - 1e-9)
            ih, ie = int(hh), int(ee)
            fh, fe = hh - ih, ee - ie
            for k in range(3):
                v = (lut[k, ih, ie] * (1.0 - fe) + lut[k, ih, ie + 1] * fe) * (1.0 - fh) + (
                    lut[k, ih + 1, ie] * (1.0 - fe) + lut[k, ih + 1, ie + 1] * fe
                ) * fh
                out[k, i, j] = np.uint8(min(max(v + noise, 0.0), 255.0))
    return out


@njit(cache=True, nogil=True)
def _phi(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


@njit(cache=True, nogil=True)
def render_footprints(
    out: np.ndarray,
    y0: int,
    x0: int,
    px_um: float,
    cx: np.ndarray,
    cy: np.ndarray,
    sigma: np.ndarray,
    kind: np.ndarray,
) -> None:
    """Add each cell's Gaussian footprint (unit mass, truncated at 3σ on whole pixels) to channel ``kind[c]``.

    A pixel receives the exact integral of the normalised truncated Gaussian over its area, so every cell's
    weights sum to one over the full raster; ``out[t]`` is the expected number of type-``t`` cells per pixel.
    """
    _, h, w = out.shape
    for c in range(cx.size):
        s = sigma[c]
        gj0 = int(math.floor((cx[c] - 3.0 * s) / px_um))
        gj1 = int(math.ceil((cx[c] + 3.0 * s) / px_um))
        gi0 = int(math.floor((cy[c] - 3.0 * s) / px_um))
        gi1 = int(math.ceil((cy[c] + 3.0 * s) / px_um))
        norm_x = _phi((gj1 * px_um - cx[c]) / s) - _phi((gj0 * px_um - cx[c]) / s)
        norm_y = _phi((gi1 * px_um - cy[c]) / s) - _phi((gi0 * px_um - cy[c]) / s)
        j0, j1 = max(gj0 - x0, 0), min(gj1 - x0, w)
        i0, i1 = max(gi0 - y0, 0), min(gi1 - y0, h)
        if j0 >= j1 or i0 >= i1:
            continue
        wx = np.empty(j1 - j0)
        for j in range(j0, j1):
            lo = ((x0 + j) * px_um - cx[c]) / s
            wx[j - j0] = (_phi(lo + px_um / s) - _phi(lo)) / norm_x
        t = kind[c]
        for i in range(i0, i1):
            lo = ((y0 + i) * px_um - cy[c]) / s
            wy = (_phi(lo + px_um / s) - _phi(lo)) / norm_y
            for j in range(j0, j1):
                out[t, i, j] += wy * wx[j - j0]


@njit(cache=True, nogil=True)
def mix_density(
    cells: np.ndarray,
    mod: np.ndarray,
    lx0: int,
    ly0: int,
    spacing: float,
    y0: int,
    x0: int,
    px_um: float,
    profiles: np.ndarray,
    morph: np.ndarray,
    baseline: np.ndarray,
    edge: float,
) -> np.ndarray:
    """Expected counts per µm² ``(G, h, w)`` from cells per pixel ``(T, h, w)`` and lattice values ``mod``.

    ``mod`` ``(G + 1, ny, nx)``: the tissue level, then each gene's gradient factor, on the lattice (bilinear
    interpolation, as :func:`interp_lattice`). Morphology-driven gene ``g``:
    ``Σ_t cells_t · profile[t, g] · mod_g / px_area``; the others ``tissue · baseline_g · mod_g``.
    """
    n_types, h, w = cells.shape
    n_genes = profiles.shape[1]
    px_area = px_um * px_um
    out = np.empty((n_genes, h, w), dtype=np.float32)
    for i in range(h):
        ky, fy = _lattice_coord(y0 + i, ly0, spacing, px_um)
        for j in range(w):
            kx, fx = _lattice_coord(x0 + j, lx0, spacing, px_um)
            w00, w01, w10, w11 = (1.0 - fx) * (1.0 - fy), fx * (1.0 - fy), (1.0 - fx) * fy, fx * fy
            lev = mod[0, ky, kx] * w00 + mod[0, ky, kx + 1] * w01 + mod[0, ky + 1, kx] * w10
            lev += mod[0, ky + 1, kx + 1] * w11
            t = min(max(0.5 + lev / edge, 0.0), 1.0)
            for g in range(n_genes):
                m = mod[g + 1, ky, kx] * w00 + mod[g + 1, ky, kx + 1] * w01 + mod[g + 1, ky + 1, kx] * w10
                m += mod[g + 1, ky + 1, kx + 1] * w11
                if morph[g]:
                    acc = 0.0
                    for k in range(n_types):
                        acc += cells[k, i, j] * profiles[k, g]
                    out[g, i, j] = acc * m / px_area
                else:
                    out[g, i, j] = t * baseline[g] * m
    return out


@njit(cache=True, nogil=True)
def render_territories(
    labels: np.ndarray,
    best: np.ndarray,
    y0: int,
    x0: int,
    px_um: float,
    cx: np.ndarray,
    cy: np.ndarray,
    radius: np.ndarray,
    ids: np.ndarray,
) -> None:
    """Label each pixel with the cell minimising ``distance / radius`` among cells whose disk covers its centre."""
    h, w = labels.shape
    for c in range(cx.size):
        r = radius[c]
        j0 = max(int(math.floor((cx[c] - r) / px_um)) - x0, 0)
        j1 = min(int(math.ceil((cx[c] + r) / px_um)) - x0, w)
        i0 = max(int(math.floor((cy[c] - r) / px_um)) - y0, 0)
        i1 = min(int(math.ceil((cy[c] + r) / px_um)) - y0, h)
        for i in range(i0, i1):
            dy = (y0 + i + 0.5) * px_um - cy[c]
            for j in range(j0, j1):
                dx = (x0 + j + 0.5) * px_um - cx[c]
                d = math.sqrt(dx * dx + dy * dy) / r
                if d < 1.0 and d < best[i, j]:
                    best[i, j] = d
                    labels[i, j] = ids[c]


@njit(cache=True, nogil=True)
def integrate_squares(
    values: np.ndarray, y0: int, x0: int, left: np.ndarray, top: np.ndarray, side: np.ndarray, out: np.ndarray
) -> None:
    """``out[u, c] += Σ_pixels values[c, i, j] · |pixel ∩ square_u|`` (areas in pixel units, exact).

    Squares are given in the raster's global pixel coordinates; ``values`` is the window starting at
    ``(y0, x0)``, so a raster can be integrated block by block.
    """
    n_ch, h, w = values.shape
    for u in range(left.size):
        xa, xb = left[u], left[u] + side[u]
        ya, yb = top[u], top[u] + side[u]
        j0 = max(int(math.floor(xa)) - x0, 0)
        j1 = min(int(math.ceil(xb)) - x0, w)
        i0 = max(int(math.floor(ya)) - y0, 0)
        i1 = min(int(math.ceil(yb)) - y0, h)
        for i in range(i0, i1):
            gy = y0 + i
            wy = min(gy + 1.0, yb) - max(float(gy), ya)
            if wy <= 0.0:
                continue
            for j in range(j0, j1):
                gx = x0 + j
                wx = min(gx + 1.0, xb) - max(float(gx), xa)
                if wx <= 0.0:
                    continue
                a = wx * wy
                for c in range(n_ch):
                    out[u, c] += values[c, i, j] * a


@njit(cache=True, nogil=True)
def integrate_circles(
    values: np.ndarray,
    y0: int,
    x0: int,
    cx: np.ndarray,
    cy: np.ndarray,
    radius: np.ndarray,
    supersample: int,
    out: np.ndarray,
) -> None:
    """``out[u, c] += Σ_pixels values[c, i, j] · |pixel ∩ disk_u|`` (areas in pixel units).

    Pixels wholly inside or outside the disk count exactly; the area of a pixel the circle crosses is the
    fraction of ``supersample × supersample`` sub-pixel centres inside the disk.
    """
    n_ch, h, w = values.shape
    k = supersample
    for u in range(cx.size):
        r = radius[u]
        r2 = r * r
        j0 = max(int(math.floor(cx[u] - r)) - x0, 0)
        j1 = min(int(math.ceil(cx[u] + r)) - x0, w)
        i0 = max(int(math.floor(cy[u] - r)) - y0, 0)
        i1 = min(int(math.ceil(cy[u] + r)) - y0, h)
        for i in range(i0, i1):
            gy = float(y0 + i)
            ny = min(max(cy[u], gy), gy + 1.0) - cy[u]
            fy = max(abs(gy - cy[u]), abs(gy + 1.0 - cy[u]))
            for j in range(j0, j1):
                gx = float(x0 + j)
                nx = min(max(cx[u], gx), gx + 1.0) - cx[u]
                if nx * nx + ny * ny >= r2:
                    continue
                fx = max(abs(gx - cx[u]), abs(gx + 1.0 - cx[u]))
                if fx * fx + fy * fy <= r2:
                    a = 1.0
                else:
                    inside = 0
                    for si in range(k):
                        sy = gy + (si + 0.5) / k - cy[u]
                        for sj in range(k):
                            sx = gx + (sj + 0.5) / k - cx[u]
                            if sx * sx + sy * sy < r2:
                                inside += 1
                    a = inside / (k * k)
                for c in range(n_ch):
                    out[u, c] += values[c, i, j] * a


@njit(cache=True, nogil=True)
def integrate_labels(
    values: np.ndarray, y0: int, x0: int, labels: np.ndarray, stride: int, lut: np.ndarray, out: np.ndarray
) -> None:
    """``out[lut[l], c] += Σ_{label pixels = l} values[c, i // stride, j // stride]`` (areas in label pixels).

    ``labels`` is the full label raster (``stride`` label pixels per value pixel); ``values`` the window of the
    value raster starting at ``(y0, x0)``; label pixels outside the window and background (0) are skipped.
    """
    n_ch, h, w = values.shape
    ny, nx = labels.shape
    for i in range(max(y0 * stride, 0), min((y0 + h) * stride, ny)):
        vi = i // stride - y0
        for j in range(max(x0 * stride, 0), min((x0 + w) * stride, nx)):
            lab = labels[i, j]
            if lab == 0:
                continue
            row = lut[lab]
            if row < 0:
                continue
            vj = j // stride - x0
            for c in range(n_ch):
                out[row, c] += values[c, vi, vj]


@njit(cache=True, nogil=True)
def gene_modulation(
    level: np.ndarray, basis: np.ndarray, loadings: np.ndarray, beta: np.ndarray, gain: np.ndarray
) -> np.ndarray:
    """``(G + 1, n)``: the tissue level, then ``gain_g · exp(β_g f_g − β_g²/2)`` with ``f_g = loadings[g] · basis``."""
    n_basis, n = basis.shape
    n_genes = loadings.shape[0]
    out = np.empty((n_genes + 1, n))
    for p in range(n):
        out[0, p] = level[p]
        for g in range(n_genes):
            f = 0.0
            for k in range(n_basis):
                f += loadings[g, k] * basis[k, p]
            out[g + 1, p] = gain[g] * math.exp(beta[g] * f - 0.5 * beta[g] * beta[g])
    return out
