"""Cell placement of the synthetic section: cells and stroma fibres, drawn per tile from the section's fields.

Each 128 µm tile draws its candidate cells and fibres from a generator seeded by ``(seed, tile)``
(:func:`_tile_cells`); :func:`_cells_near` gathers the tiles around a window and thins the cells by a Matérn
type II hard core, so any window sees the same cells whatever its size.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from . import _kernels as K
from ._section import (
    _F_BASIS,
    _F_HOLES,
    _F_ORIENT,
    _F_OUTLINE,
    _LATTICE_UM,
    _N_BASIS,
    _TILE_UM,
    _interp_points,
    _Section,
    _tissue_level,
)

_HALO_UM = 64.0  # no cell or fibre reaches further than this from its centre
_MAX_PER_TILE = 4096  # cell ids: tile index × this + index in tile + 1
_DOMAIN_SHARPNESS = 1.5


@dataclass
class _Cells:
    """Cells (and fibres) of a set of tiles, in global tile order; positions in µm."""

    ids: np.ndarray
    kind: np.ndarray
    x: np.ndarray
    y: np.ndarray
    nx: np.ndarray  # nucleus centre
    ny: np.ndarray
    a: np.ndarray
    b: np.ndarray
    theta: np.ndarray
    hema: np.ndarray
    rim: np.ndarray
    texture: np.ndarray
    cyto_r: np.ndarray
    cyto_e: np.ndarray
    vacuole: np.ndarray
    sigma: np.ndarray
    fx: np.ndarray  # fibres
    fy: np.ndarray
    fa: np.ndarray
    fb: np.ndarray
    ftheta: np.ndarray
    fval: np.ndarray
    fids: np.ndarray


def _tile_cells(sec: _Section, ty: int, tx: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([sec.seed, 1, ty, tx])
    p = sec.type_params
    n_types = len(sec.type_names)
    lam = float(p["density"].max())
    area = _TILE_UM * _TILE_UM
    n = rng.poisson(lam * area)
    x = (tx + rng.random(n)) * _TILE_UM
    y = (ty + rng.random(n)) * _TILE_UM
    u_type, u_keep, mark = rng.random(n), rng.random(n), rng.random(n)
    jit = np.clip(rng.lognormal(0.0, 0.12, (4, n)), 0.75, 1.3)
    ang, ang_noise, off_ang = rng.uniform(0, np.pi, n), rng.normal(0, 0.2, n), rng.uniform(0, 2 * np.pi, n)
    # Fibres.
    fmax = max(float(p["fibres"].max()), 1e-12)
    nf = rng.poisson(fmax * area)
    fx, fy = (tx + rng.random(nf)) * _TILE_UM, (ty + rng.random(nf)) * _TILE_UM
    f_keep = rng.random(nf)
    fa, fb = rng.uniform(5.0, 14.0, nf), rng.uniform(0.45, 0.9, nf)
    f_noise, fval = rng.normal(0, 0.25, nf), 0.22 * rng.uniform(0.7, 1.3, nf)

    # Fields at the points, interpolated from the tile's lattice points (the same points the rasters use).
    k = int(round(_TILE_UM / _LATTICE_UM))
    gx, gy = np.meshgrid(
        np.arange(tx * k, tx * k + k + 1) * _LATTICE_UM, np.arange(ty * k, ty * k + k + 1) * _LATTICE_UM
    )
    wanted = [_F_OUTLINE, _F_HOLES, _F_ORIENT, *range(_F_BASIS + _N_BASIS, _F_BASIS + _N_BASIS + n_types)]
    lat = K.eval_fields(gx.ravel(), gy.ravel(), sec.omega[wanted], sec.phase[wanted])
    lat[1] = _tissue_level(sec, gx.ravel(), gy.ravel(), lat[0], lat[1])
    vals = _interp_points(lat[1:].reshape(-1, k + 1, k + 1), np.concatenate([x, fx]), np.concatenate([y, fy]),
                          tx * k, ty * k)  # fmt: skip
    level = vals[0]
    logits = _DOMAIN_SHARPNESS * vals[2:]
    prob = np.exp(logits - logits.max(axis=0))
    prob /= prob.sum(axis=0)
    orient = vals[1] * np.pi

    # Cells: type from the local mixture, thinned by the type's density.
    cum = np.cumsum(prob[:, :n], axis=0)
    kind = np.minimum((u_type[None] > cum).sum(axis=0), n_types - 1)
    keep = (level[:n] > 0) & (u_keep < p["density"][kind] / lam)
    keep &= np.arange(n) < _MAX_PER_TILE
    kind = kind[keep]
    x, y = x[keep], y[keep]
    jit = jit[:, keep]
    theta = np.where(p["aligned"][kind] > 0, orient[:n][keep] + ang_noise[keep], ang[keep])
    cyto_r = p["cyto_r"][kind] * jit[2]
    vac = p["vacuole"][kind] > 0
    off = np.where(vac, 0.85 * cyto_r, 0.0)
    nx = x + off * np.cos(off_ang[keep])
    ny = y + off * np.sin(off_ang[keep])
    theta = np.where(vac, off_ang[keep] + np.pi / 2, theta)  # flattened along the adipocyte membrane
    tile = ty * sec.n_tiles_x + tx
    cells = {
        "ids": (tile * _MAX_PER_TILE + np.arange(1, keep.sum() + 1)).astype(np.int64),
        "kind": kind.astype(np.int64),
        "x": x,
        "y": y,
        "nx": nx,
        "ny": ny,
        "a": p["nucleus_a"][kind] * jit[0],
        "b": p["nucleus_b"][kind] * jit[1],
        "theta": theta,
        "hema": p["hema"][kind] * jit[3],
        "rim": p["rim"][kind],
        "texture": p["texture"][kind],
        "cyto_r": cyto_r,
        "cyto_e": p["cyto_e"][kind],
        "vacuole": vac.astype(np.float64),
        "sigma": p["sigma"][kind] * jit[2],
        "exclusion": np.where(
            vac, 0.8 * cyto_r, 0.45 * (p["nucleus_a"][kind] * jit[0] + p["nucleus_b"][kind] * jit[1])
        ),
        "mark": np.where(vac, mark[keep] - 1.0, mark[keep]),  # adipocytes win: nothing sits inside a vacuole
    }
    # Fibres: density from the local mixture, inside tissue.
    fdens = (prob[:, n:] * p["fibres"][:, None]).sum(axis=0)
    fkeep = (level[n:] > 0) & (f_keep < fdens / fmax)
    cells.update(
        fx=fx[fkeep],
        fy=fy[fkeep],
        fa=fa[fkeep],
        fb=fb[fkeep],
        ftheta=(orient[n:] + f_noise)[fkeep],
        fval=fval[fkeep],
        fids=(tile * _MAX_PER_TILE + np.arange(1, fkeep.sum() + 1)).astype(np.int64),
    )
    return cells


def _cells_near(sec: _Section, x0_um: float, x1_um: float, y0_um: float, y1_um: float) -> _Cells:
    """All cells and fibres of the tiles within the halo of the box, in global tile order.

    Cells are thinned by a Matérn type II hard core (a cell is removed when another with a lower mark lies
    closer than the sum of their exclusion radii), which needs the candidates of one more ring of tiles.
    """
    n_ty = int(math.ceil(sec.height_um / _TILE_UM))
    n_tx = sec.n_tiles_x
    tx0 = max(int(math.floor((x0_um - _HALO_UM) / _TILE_UM)), 0)
    tx1 = min(int(math.floor((x1_um + _HALO_UM) / _TILE_UM)) + 1, n_tx)
    ty0 = max(int(math.floor((y0_um - _HALO_UM) / _TILE_UM)), 0)
    ty1 = min(int(math.floor((y1_um + _HALO_UM) / _TILE_UM)) + 1, n_ty)
    tx1, ty1 = max(tx1, tx0), max(ty1, ty0)
    ring = [
        _tile_cells(sec, ty, tx)
        for ty in range(max(ty0 - 1, 0), min(ty1 + 1, n_ty))
        for tx in range(max(tx0 - 1, 0), min(tx1 + 1, n_tx))
    ]
    if not ring:
        ring = [{k: v[:0] for k, v in _tile_cells(sec, 0, 0).items()}]
    allc = {k: np.concatenate([t[k] for t in ring]) for k in ring[0]}
    keep = _hard_core(allc["x"], allc["y"], allc["exclusion"], allc["mark"])
    tile = allc["ids"] // _MAX_PER_TILE
    keep &= _in_tiles(tile, n_tx, ty0, ty1, tx0, tx1)
    ftile = allc["fids"] // _MAX_PER_TILE
    fkeep = _in_tiles(ftile, n_tx, ty0, ty1, tx0, tx1)
    fields = {f.name for f in dataclasses.fields(_Cells)}
    return _Cells(**{k: v[fkeep] if k.startswith("f") else v[keep] for k, v in allc.items() if k in fields})


def _in_tiles(tile: np.ndarray, n_tx: int, ty0: int, ty1: int, tx0: int, tx1: int) -> np.ndarray:
    ty, tx = np.divmod(tile, n_tx)
    return (ty >= ty0) & (ty < ty1) & (tx >= tx0) & (tx < tx1)


def _hard_core(x: np.ndarray, y: np.ndarray, exclusion: np.ndarray, mark: np.ndarray) -> np.ndarray:
    """Matérn II thinning: ``False`` for every point with a lower-marked point within the summed exclusion radii."""
    from scipy.spatial import cKDTree

    keep = np.ones(x.size, dtype=bool)
    if x.size < 2:
        return keep
    tree = cKDTree(np.stack([x, y], axis=1))
    pairs = tree.query_pairs(2.0 * float(exclusion.max()), output_type="ndarray")
    if pairs.size == 0:
        return keep
    i, j = pairs[:, 0], pairs[:, 1]
    d2 = (x[i] - x[j]) ** 2 + (y[i] - y[j]) ** 2
    hit = d2 < (exclusion[i] + exclusion[j]) ** 2
    i, j = i[hit], j[hit]
    loser = np.where(mark[i] > mark[j], i, j)
    keep[loser] = False
    return keep
