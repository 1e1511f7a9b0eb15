"""The random parameters of one synthetic section and its smooth random fields.

:class:`_Section` holds everything random about a section (cell types, gene programme, random-field frequencies
and phases), drawn by :func:`_make_section` from ``seed`` and ``tissue_seed``; :func:`_lattice` evaluates the
smooth fields (tissue level, stain drift, orientation, gradients, cell-type domains) on the 8 µm lattice that
every pixel-level field is interpolated from, and :func:`_interp_points` interpolates them at points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import _kernels as K

#: Morphology of the base cell types (µm, cells per µm², stain concentrations). More types than five are
#: jittered copies. ``nucleus_a``/``nucleus_b``: semi-axes; ``rim``: vesicular chromatin (darker rim);
#: ``texture``: chromatin grain; ``cyto_r``/``cyto_e``: cytoplasm radius and eosin; ``vacuole``: clear cell
#: (adipocyte) with the nucleus at its edge; ``aligned``: nucleus follows the fibre orientation;
#: ``sigma``: Gaussian expression footprint; ``fibres``: stroma fibres per µm² in its domain.
CELL_TYPES: dict[str, dict[str, float]] = {
    "tumour": {"density": 0.012, "nucleus_a": 4.6, "nucleus_b": 3.6, "hema": 0.75, "rim": 0.7, "texture": 0.6,
               "cyto_r": 7.0, "cyto_e": 0.22, "vacuole": 0, "aligned": 0, "sigma": 3.5, "fibres": 0.001},
    "lymphocyte": {"density": 0.016, "nucleus_a": 2.5, "nucleus_b": 2.3, "hema": 1.7, "rim": 0.0, "texture": 0.2,
                   "cyto_r": 3.4, "cyto_e": 0.05, "vacuole": 0, "aligned": 0, "sigma": 2.2, "fibres": 0.001},
    "fibroblast": {"density": 0.003, "nucleus_a": 6.5, "nucleus_b": 1.4, "hema": 1.2, "rim": 0.0, "texture": 0.3,
                   "cyto_r": 5.0, "cyto_e": 0.05, "vacuole": 0, "aligned": 1, "sigma": 4.0, "fibres": 0.007},
    "epithelial": {"density": 0.006, "nucleus_a": 3.6, "nucleus_b": 2.9, "hema": 1.0, "rim": 0.25, "texture": 0.4,
                   "cyto_r": 7.5, "cyto_e": 0.5, "vacuole": 0, "aligned": 0, "sigma": 4.5, "fibres": 0.0005},
    "adipocyte": {"density": 0.001, "nucleus_a": 4.0, "nucleus_b": 1.3, "hema": 1.2, "rim": 0.0, "texture": 0.2,
                  "cyto_r": 20.0, "cyto_e": 0.0, "vacuole": 1, "aligned": 0, "sigma": 8.0, "fibres": 0.0},
}  # fmt: skip

_TILE_UM = 128.0  # cells and fibres are drawn per tile of this size, seeded by (seed, tile)
_LATTICE_UM = 8.0  # smooth fields are interpolated from a lattice of this spacing
_N_MODES = 16  # cosines per random field
_N_BASIS = 4  # gradient fields shared by all genes
_EDGE = 0.01  # width of the tissue edge in units of the tissue level


@dataclass(frozen=True)
class _Section:
    """Every random parameter of one section; rendering a window needs only this and the window."""

    seed: int
    um_per_px: float
    truth_um_per_px: float
    stride: int
    ny: int
    nx: int
    type_names: tuple[str, ...]
    type_params: dict[str, np.ndarray]  # per type arrays
    omega: np.ndarray  # (F, M, 2) random-field frequencies, fields: outline, holes, stain, orient, basis×B, domain×T
    phase: np.ndarray  # (F, M)
    profiles: np.ndarray  # (T, G) expected counts per cell
    morph: np.ndarray  # (G,) bool
    baseline: np.ndarray  # (G,) counts per µm² of non-morphology genes
    beta: np.ndarray  # (G,) gradient strength
    gain: np.ndarray  # (G,) 1
    loadings: np.ndarray  # (G, B) unit-norm loadings on the basis fields

    @property
    def height_um(self) -> float:
        return self.ny * self.um_per_px

    @property
    def width_um(self) -> float:
        return self.nx * self.um_per_px

    @property
    def n_tiles_x(self) -> int:
        return int(math.ceil(self.width_um / _TILE_UM))


# Field indices in _Section.omega.
_F_OUTLINE, _F_HOLES, _F_STAIN, _F_ORIENT, _F_BASIS = 0, 1, 2, 3, 4


def _make_section(
    *,
    seed: int,
    tissue_seed: int,
    um_per_px: float,
    truth_um_per_px: float,
    stride: int,
    ny: int,
    nx: int,
    n_genes: int,
    n_cell_types: int,
    mean_counts_per_um2: float,
) -> _Section:
    rng = np.random.default_rng([seed, 0])  # this section: domains, fields
    biology = np.random.default_rng([tissue_seed, 3])  # shared by sections of one tissue: types and gene programme
    names, params = _cell_types(n_cell_types, biology)
    # Random fields: wavelength ranges (µm) per field.
    wavelengths = [(500.0, 1500.0), (90.0, 260.0), (300.0, 900.0), (150.0, 400.0)]
    wavelengths += [(300.0, 1500.0)] * _N_BASIS + [(120.0, 400.0)] * n_cell_types
    n_fields = len(wavelengths)
    omega = np.empty((n_fields, _N_MODES, 2))
    for f, (lo, hi) in enumerate(wavelengths):
        k = 2 * np.pi / rng.uniform(lo, hi, _N_MODES)
        angle = rng.uniform(0, 2 * np.pi, _N_MODES)
        omega[f, :, 0], omega[f, :, 1] = k * np.cos(angle), k * np.sin(angle)
    phase = rng.uniform(0, 2 * np.pi, (n_fields, _N_MODES))
    # Genes: a fifth (at least one when there are five or more) follow only the gradients.
    n_free = n_genes // 5
    morph = np.ones(n_genes, dtype=bool)
    morph[biology.permutation(n_genes)[:n_free]] = False
    n_morph = int(morph.sum())
    base = biology.normal(0.0, 1.0, n_genes)
    log_fc = biology.normal(0.0, 0.5, (n_cell_types, n_genes))
    marker_of = biology.permutation(np.arange(n_genes) % n_cell_types)
    log_fc[marker_of, np.arange(n_genes)] += biology.uniform(2.0, 3.0, n_genes)
    profiles = np.exp(base + log_fc)
    profiles[:, ~morph] = 0.0
    share_morph = n_morph / n_genes
    if n_morph:
        totals = mean_counts_per_um2 * share_morph / _effective_density(params)  # counts per cell
        profiles *= (totals / profiles.sum(axis=1))[:, None]
    baseline = np.zeros(n_genes)
    if n_free:
        weights = np.exp(base[~morph])
        baseline[~morph] = mean_counts_per_um2 * (1 - share_morph) * weights / weights.sum()
    beta = np.where(morph, biology.uniform(0.1, 0.35, n_genes), biology.uniform(0.6, 1.0, n_genes))
    loadings = biology.normal(size=(n_genes, _N_BASIS))
    loadings /= np.linalg.norm(loadings, axis=1, keepdims=True)
    return _Section(
        seed=seed,
        um_per_px=um_per_px,
        truth_um_per_px=truth_um_per_px,
        stride=stride,
        ny=ny,
        nx=nx,
        type_names=tuple(names),
        type_params=params,
        omega=omega,
        phase=phase,
        profiles=profiles,
        morph=morph,
        baseline=baseline,
        beta=beta,
        gain=np.ones(n_genes),
        loadings=loadings,
    )


def _effective_density(params: dict[str, np.ndarray]) -> np.ndarray:
    """Cells per µm² of each type in a pure domain after the hard core (``(1 − e^{−λA}) / A``)."""
    exclusion = np.where(
        params["vacuole"] > 0, 0.8 * params["cyto_r"], 0.45 * (params["nucleus_a"] + params["nucleus_b"])
    )
    area = np.pi * (2 * exclusion) ** 2
    return -np.expm1(-params["density"] * area) / area


def _cell_types(n: int, rng: np.random.Generator) -> tuple[list[str], dict[str, np.ndarray]]:
    base = list(CELL_TYPES)
    names, rows = [], []
    for t in range(n):
        name = base[t % len(base)]
        row = dict(CELL_TYPES[name])
        if t >= len(base):  # a variant: same family, other size, stain and density
            name = f"{name}_{t // len(base) + 1}"
            size = rng.uniform(0.7, 1.3)
            for key in ("nucleus_a", "nucleus_b", "sigma"):
                row[key] *= size
            row["cyto_r"] = min(row["cyto_r"] * size, 22.0)
            row["hema"] *= rng.uniform(0.7, 1.3)
            row["cyto_e"] = min(row["cyto_e"] * rng.uniform(0.5, 1.5) + 0.05, 0.6)
            row["density"] *= rng.uniform(0.6, 1.4)
        names.append(name)
        rows.append(row)
    return names, {key: np.array([r[key] for r in rows], dtype=np.float64) for key in rows[0]}


def _tissue_level(sec: _Section, x: np.ndarray, y: np.ndarray, outline: np.ndarray, holes: np.ndarray) -> np.ndarray:
    """Signed tissue level (> 0 inside tissue) at points (µm), from the outline and hole fields there."""
    rho2 = ((x - sec.width_um / 2) / (sec.width_um / 2)) ** 2 + ((y - sec.height_um / 2) / (sec.height_um / 2)) ** 2
    return np.minimum(1.0 + 0.4 * outline - 1.25 * rho2, 1.5 * (1.8 - holes))


def _interp_points(lat: np.ndarray, x: np.ndarray, y: np.ndarray, kx0: int, ky0: int) -> np.ndarray:
    """Bilinear interpolation at points (µm) of lattice values ``(F, ny, nx)`` whose first point is ``(kx0, ky0)``."""
    gx, gy = x / _LATTICE_UM, y / _LATTICE_UM
    kx, ky = np.floor(gx), np.floor(gy)
    fx, fy = gx - kx, gy - ky
    ix = np.clip(kx.astype(np.int64) - kx0, 0, lat.shape[2] - 2)
    iy = np.clip(ky.astype(np.int64) - ky0, 0, lat.shape[1] - 2)
    v00, v01 = lat[:, iy, ix], lat[:, iy, ix + 1]
    v10, v11 = lat[:, iy + 1, ix], lat[:, iy + 1, ix + 1]
    return (v00 * (1.0 - fx) + v01 * fx) * (1.0 - fy) + (v10 * (1.0 - fx) + v11 * fx) * fy


def _lattice(sec: _Section, y0: int, x0: int, h: int, w: int, px_um: float, fields: list[int]) -> tuple:
    """Fields at the lattice points around a window: (values (F+1, ny, nx) with the tissue level first, lx0, ly0)."""
    lx0 = int(math.floor((x0 + 0.5) * px_um / _LATTICE_UM))
    lx1 = int(math.floor((x0 + w - 0.5) * px_um / _LATTICE_UM)) + 1
    ly0 = int(math.floor((y0 + 0.5) * px_um / _LATTICE_UM))
    ly1 = int(math.floor((y0 + h - 0.5) * px_um / _LATTICE_UM)) + 1
    gx, gy = np.meshgrid(np.arange(lx0, lx1 + 1) * _LATTICE_UM, np.arange(ly0, ly1 + 1) * _LATTICE_UM)
    wanted = [_F_OUTLINE, _F_HOLES, *fields]
    vals = K.eval_fields(gx.ravel(), gy.ravel(), sec.omega[wanted], sec.phase[wanted])
    level = _tissue_level(sec, gx.ravel(), gy.ravel(), vals[0], vals[1])
    out = np.concatenate([level[None], vals[2:]]).reshape(len(fields) + 1, *gx.shape)
    return out, lx0, ly0
