"""A seeded, procedural H&E-like tissue section with ground-truth expression density.

How the section is made (all sizes in µm; everything derives from ``seed``):

* **Smooth random fields** (sums of random cosines, unit variance) give the tissue outline (a blob filling most
  of the section, with a few holes), one *domain* field per cell type (a softmax of them is the local cell-type
  mixture), the fibre orientation, a stain-intensity drift, and four gradient fields that modulate expression.
  Pixel-level fields are interpolated from an 8 µm lattice anchored at the origin.
* **Cells** are drawn per 128 µm tile (seed derived from ``(seed, tile)``): a Poisson process thinned by the
  tissue outline and the cell-type density. Each type has its own nucleus size, shape, haematoxylin intensity
  and texture, cytoplasm and density (see :data:`CELL_TYPES`), so the type is visible in the image.
  Stroma fibres (thin eosin ellipses aligned with the orientation field) are drawn the same way.
* **Image**: haematoxylin and eosin concentrations are summed and turned into RGB by Beer–Lambert.
* **Truth**: each cell spreads ``profile[type]`` expected counts over a Gaussian footprint (integrated exactly
  over truth pixels); morphology-driven genes are that, times a smooth gradient; the other genes follow only
  the gradients inside the tissue. Values are expected counts per µm² (``value_kind="density"``).
* **Measured units** integrate the truth exactly over their footprints (:func:`._units._integrate_density`)
  and draw Poisson or negative-binomial counts.

Every pixel is computed from global coordinates, so generating by chunks (dask) equals generating at once.

This module is the entry point: :func:`synthetic` checks its arguments (:func:`_check`), builds the section
and its rasters, and assembles the SpatialData (:func:`_assemble`). The parts live in ``_section`` (random
parameters and fields), ``_cells`` (cell placement), ``_render`` (image and truth rasters), ``_units``
(measured units and counts) and ``_kernels`` (the numba kernels).
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from stpredict._errors import InputError
from stpredict._geometry import set_um_per_px
from stpredict._logging import get_logger
from stpredict._meta import set_element_meta
from stpredict.io._image import build_image

from ._cells import _Cells, _cells_near
from ._render import _lazy_raster, _render_cells_per_px, _render_image, _render_truth_window
from ._section import CELL_TYPES, _make_section, _Section
from ._units import _add_units

if TYPE_CHECKING:
    from spatialdata import SpatialData

__all__ = ["CELL_TYPES", "synthetic"]

logger = get_logger(__name__)

_LAZY_THRESHOLD_PX = 64_000_000
_LAYOUTS = ("st", "visium", "visium_hd", "cells")


# ----------------------------------------------------------------------------------------------------------------
# Public


def synthetic(
    *,
    shape_um: tuple[float, float] = (1000.0, 1000.0),
    um_per_px: float = 0.5,
    n_genes: int = 50,
    n_cell_types: int = 5,
    layout: Literal["st", "visium", "visium_hd", "cells"] | None = "st",
    bin_size_um: float | None = None,
    counts: Literal["poisson", "nb"] = "poisson",
    dispersion: float = 0.2,
    mean_counts_per_um2: float = 0.1,
    truth_um_per_px: float = 2.0,
    min_tissue_fraction: float = 0.5,
    seed: int = 0,
    tissue_seed: int = 0,
    lazy: bool | None = None,
    chunk_px: int = 2048,
    section: str = "synthetic",
    patient: str = "P0",
) -> SpatialData:
    """A seeded, procedural H&E-like tissue section with known expression density and measured counts.

    Parameters
    ----------
    shape_um
        Section size ``(height, width)`` in µm. The image has ``round(size / truth_um_per_px) · stride`` pixels
        per axis, so the truth grid tiles it exactly.
    um_per_px
        Image pixel size.
    n_genes
        Number of genes ``Gene000, Gene001, ...``; a fifth of them (``var["morphology_driven"] == False``) follow
        only smooth spatial gradients, unrelated to the cells.
    n_cell_types
        Number of cell types; the first five are tumour, lymphocyte, fibroblast, epithelial, adipocyte
        (:data:`CELL_TYPES`), more are variants of these.
    layout
        Measured units: ``"st"`` (100 µm spots, 200 µm pitch, square grid), ``"visium"`` (55 µm spots, 100 µm
        pitch, hexagonal), ``"visium_hd"`` (square bins of ``bin_size_um`` aligned at the origin), ``"cells"``
        (cell territories as labels at the image resolution), or ``None`` (image and truth only).
    bin_size_um
        Bin side for ``layout="visium_hd"`` (default 8 µm); any positive value.
    counts
        ``"poisson"`` or ``"nb"`` (negative binomial, variance ``μ + dispersion · μ²``).
    dispersion
        Negative-binomial dispersion.
    mean_counts_per_um2
        Approximate expected counts per µm² of tissue, summed over genes.
    truth_um_per_px
        Pixel size of the ground-truth density; a whole multiple of ``um_per_px``.
    min_tissue_fraction
        Units with less of their area on tissue are dropped.
    seed
        The section: tissue outline, domains, cells and counts derive from it; the same seeds give identical arrays.
    tissue_seed
        The tissue's biology: cell-type appearance and the gene programme (cell-type profiles, which genes follow
        morphology, gradients). Sections of one study share it, so a model trained on one section applies to
        another; change it for an unrelated tissue.
    lazy
        Build the image and truth as dask arrays, chunk by chunk; ``None``: above 64 megapixels.
    chunk_px
        Chunk size of the image (rounded to a multiple of the truth stride); truth chunks are ``chunk_px / stride``.
    section, patient
        Written to ``obs``.

    Returns
    -------
    SpatialData with

    - ``images["he"]``: uint8 ``(c=["r","g","b"], y, x)``, multiscale; coordinate systems ``"global"`` (identity,
      image pixels) and ``"um"``.
    - ``images["truth"]``: float32 ``(c=genes, y, x)``, expected counts per µm², transformation ``Scale(stride)``
      to ``"global"``; element meta ``value_kind="density"``.
    - ``shapes["spots"]`` (circles) or ``shapes["bins"]`` (square polygons), in image pixels; or
      ``labels["cells"]`` (uint32, image resolution).
    - ``tables["table"]``: integer counts (csr float32), ``layers["expected"]`` (true expected counts),
      ``obsm["cell_type_fractions"]``, ``obsm["spatial"]`` (unit centres, image pixels), ``obs`` ``instance_id``,
      ``region``, ``array_row``, ``array_col``, ``section``, ``patient``, ``n_cells``, ``tissue_fraction``;
      ``var["morphology_driven"]``, ``varm["cell_type_profiles"]`` (expected counts per cell),
      ``uns["stpredict"]["synthetic"]`` (all parameters and the cell types).
    """
    t_start = time.perf_counter()
    stride = _check(shape_um, um_per_px, n_genes, n_cell_types, layout, bin_size_um, counts, dispersion,
                    mean_counts_per_um2, truth_um_per_px, min_tissue_fraction, chunk_px)  # fmt: skip
    if layout == "visium_hd" and bin_size_um is None:
        bin_size_um = 8.0
    th = max(round(shape_um[0] / truth_um_per_px), 1)
    tw = max(round(shape_um[1] / truth_um_per_px), 1)
    ny, nx = th * stride, tw * stride
    if lazy is None:
        lazy = ny * nx > _LAZY_THRESHOLD_PX
    if lazy and layout == "cells":
        msg = "layout='cells' needs the whole label image in memory; use lazy=False or another layout."
        raise InputError(msg)
    chunk_px = max(chunk_px // stride, 1) * stride
    sec = _make_section(seed=seed, tissue_seed=tissue_seed, um_per_px=um_per_px, truth_um_per_px=truth_um_per_px,
                        stride=stride, ny=ny, nx=nx, n_genes=n_genes, n_cell_types=n_cell_types,
                        mean_counts_per_um2=mean_counts_per_um2)  # fmt: skip
    genes = [f"Gene{g:03d}" for g in range(n_genes)]
    if lazy:
        image = _lazy_raster(lambda y0, x0, h, w: _render_image(sec, y0, x0, h, w), 3, ny, nx, chunk_px, np.uint8)
        tchunk = chunk_px // stride
        truth = _lazy_raster(lambda y0, x0, h, w: _render_truth_window(sec, y0, x0, h, w),
                             n_genes, th, tw, tchunk, np.float32)  # fmt: skip
        cells = cells_per_px = None
    else:
        cells = _cells_near(sec, 0.0, sec.width_um, 0.0, sec.height_um)
        image = _render_image(sec, 0, 0, ny, nx, cells)
        cells_per_px = _render_cells_per_px(sec, 0, 0, th, tw, cells)
        truth = _render_truth_window(sec, 0, 0, th, tw, cells_per_px)
    params = {
        "shape_um": [float(shape_um[0]), float(shape_um[1])],
        "um_per_px": float(um_per_px),
        "n_genes": int(n_genes),
        "n_cell_types": int(n_cell_types),
        "layout": layout,
        "bin_size_um": None if bin_size_um is None else float(bin_size_um),
        "counts": counts,
        "dispersion": float(dispersion),
        "mean_counts_per_um2": float(mean_counts_per_um2),
        "truth_um_per_px": float(truth_um_per_px),
        "min_tissue_fraction": float(min_tissue_fraction),
        "seed": int(seed),
        "tissue_seed": int(tissue_seed),
        "lazy": bool(lazy),
        "chunk_px": int(chunk_px),
        "section": section,
        "patient": patient,
        "cell_types": list(sec.type_names),
    }
    sdata = _assemble(sec, image, truth, genes, layout, bin_size_um, counts, dispersion, min_tissue_fraction,
                      chunk_px, params, section, patient, cells, cells_per_px)  # fmt: skip
    logger.info("synthetic section %d × %d px built in %.2f s", ny, nx, time.perf_counter() - t_start)
    return sdata


def _check(
    shape_um: Any,
    um_per_px: float,
    n_genes: int,
    n_cell_types: int,
    layout: Any,
    bin_size_um: float | None,
    counts: str,
    dispersion: float,
    mean_counts_per_um2: float,
    truth_um_per_px: float,
    min_tissue_fraction: float,
    chunk_px: int,
) -> int:
    def positive(name: str, value: Any) -> None:
        if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
            msg = f"{name} must be a positive number, got {value!r}."
            raise InputError(msg)

    if len(tuple(shape_um)) != 2:
        msg = f"shape_um must be (height, width) in µm, got {shape_um!r}."
        raise InputError(msg)
    for name, value in [("shape_um[0]", shape_um[0]), ("shape_um[1]", shape_um[1]), ("um_per_px", um_per_px),
                        ("truth_um_per_px", truth_um_per_px), ("mean_counts_per_um2", mean_counts_per_um2),
                        ("dispersion", dispersion), ("chunk_px", chunk_px)]:  # fmt: skip
        positive(name, value)
    for name, value in [("n_genes", n_genes), ("n_cell_types", n_cell_types)]:
        if not isinstance(value, int | np.integer) or value < 1:
            msg = f"{name} must be a positive integer, got {value!r}."
            raise InputError(msg)
    if layout is not None and layout not in _LAYOUTS:
        msg = f"layout must be one of {_LAYOUTS} or None, got {layout!r}."
        raise InputError(msg)
    if bin_size_um is not None:
        if layout != "visium_hd":
            msg = f"bin_size_um applies to layout='visium_hd' only (layout={layout!r}); leave it None."
            raise InputError(msg)
        positive("bin_size_um", bin_size_um)
    if counts not in ("poisson", "nb"):
        msg = f"counts must be 'poisson' or 'nb', got {counts!r}."
        raise InputError(msg)
    if not 0 <= min_tissue_fraction <= 1:
        msg = f"min_tissue_fraction must lie in [0, 1], got {min_tissue_fraction!r}."
        raise InputError(msg)
    ratio = truth_um_per_px / um_per_px
    stride = round(ratio)
    if stride < 1 or abs(ratio - stride) > 1e-6 * ratio:
        msg = (
            f"truth_um_per_px ({truth_um_per_px}) must be a whole multiple of um_per_px ({um_per_px}) so the truth "
            f"grid aligns with the image pixels; e.g. truth_um_per_px={max(stride, 1) * um_per_px}."
        )
        raise InputError(msg)
    return stride


def _as_dask(x: np.ndarray, chunk: int) -> Any:
    """A dask array whose blocks are views of ``x`` (``da.from_array`` would copy and hash it)."""
    import uuid

    import dask.array as da

    chunks = da.core.normalize_chunks((x.shape[0], chunk, chunk), x.shape)
    ys, xs = np.cumsum((0, *chunks[1])), np.cumsum((0, *chunks[2]))
    name = f"synthetic-{uuid.uuid4().hex}"
    graph = {
        (name, 0, i, j): x[:, ys[i] : ys[i + 1], xs[j] : xs[j + 1]]
        for i in range(len(ys) - 1)
        for j in range(len(xs) - 1)
    }
    return da.Array(graph, name, chunks, dtype=x.dtype)


def _scale_factors(ny: int, nx: int, coarsest: int = 256) -> list[int]:
    """Factors of 2 until the largest side is at most ``coarsest``; at least one level, so "he" is always a pyramid."""
    if min(ny, nx) < 2:
        return []
    factors = [2]
    while max(ny, nx) // 2 ** len(factors) > coarsest and min(ny, nx) // 2 ** (len(factors) + 1) >= 1:
        factors.append(2)
    return factors


def _assemble(
    sec: _Section,
    image: Any,
    truth: Any,
    genes: list[str],
    layout: str | None,
    bin_size_um: float | None,
    counts: str,
    dispersion: float,
    min_tissue_fraction: float,
    chunk_px: int,
    params: dict[str, Any],
    section: str,
    patient: str,
    cells: _Cells | None,
    cells_per_px: np.ndarray | None,
) -> SpatialData:
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity, Scale

    ident = {"global": Identity()}
    tchunk = chunk_px // sec.stride
    factors = _scale_factors(sec.ny, sec.nx)
    if isinstance(image, np.ndarray):
        # In memory: build the pyramid once with numpy, so that reading a tile from a coarse level does not
        # recompute the downscaling of a whole chunk (as a lazily coarsened level would, on every read).
        truth_d = _as_dask(truth, tchunk)
        he = build_image(
            np.ascontiguousarray(image.transpose(1, 2, 0)),
            transformations=ident,
            scale_factors=factors,
            chunks=chunk_px,
            name="synthetic-he",
        )
    else:
        truth_d = truth
        he = Image2DModel.parse(
            image,
            dims=("c", "y", "x"),
            c_coords=["r", "g", "b"],
            scale_factors=factors or None,
            transformations=ident,
            chunks=(3, chunk_px, chunk_px),
        )
    truth_el = Image2DModel.parse(
        truth_d,
        dims=("c", "y", "x"),
        c_coords=genes,
        transformations={"global": Scale([sec.stride, sec.stride], axes=("x", "y"))},
        chunks=(len(genes), tchunk, tchunk),
    )
    sdata = SpatialData(images={"he": he, "truth": truth_el})
    if layout is not None:
        _add_units(sdata, sec, truth, genes, layout, bin_size_um, counts, dispersion, min_tissue_fraction, params,
                   section, patient, cells, cells_per_px)  # fmt: skip
    set_um_per_px(sdata, "he", sec.um_per_px)
    set_element_meta(sdata, "truth", sdata.images["truth"], {"value_kind": "density", "units": "counts per um2",
                                                             "source": "stpredict.datasets.synthetic"})  # fmt: skip
    return sdata
