"""Plain numpy/scipy metric functions on dense ``(units × genes)`` arrays (SPEC.md §1.4).

Every function takes the measured values ``y`` and the predictions ``y_hat`` as arrays of the same shape
``(n_units, n_genes)``, in the normalised space the metrics are meant for, and computes in float64.

* **Gene-wise PCC** (EGN, SGN, PixNet): ``corr(y[:, g], y_hat[:, g])`` across units, one value per gene.
  PCC@F, PCC@S and PCC@M are its first quartile, median and mean over genes. The published code
  (``Yan98/EGN:v1/train.py:compute_correlations``) sets undefined correlations (a constant column) to −1
  before the summary: ``nan_policy="minus_one"``.
* **PCC@H** (TRIPLEX, not a PixNet metric): the mean gene-wise PCC over the top-50 *highly predictive genes*,
  ranked over cross-validation folds with :func:`highly_predictive_genes`.
* **Spot-wise PCC** (MagNet): ``corr(y[n, :], y_hat[n, :])`` across genes within one unit, averaged over units.
  It is a different quantity from gene-wise PCC, inflated by between-gene mean differences; never compare it
  with PCC@M.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from stpredict._errors import InputError

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

__all__ = [
    "NAN_POLICIES",
    "genewise_pcc",
    "genewise_spearman",
    "grid_raster_index",
    "grid_ssim",
    "highly_predictive_genes",
    "mae",
    "mse",
    "pcc_summary",
    "policy_mean",
    "spotwise_pcc",
]

NanPolicy = Literal["minus_one", "omit", "propagate"]
#: ``"minus_one"``: undefined correlations count as −1 (published convention); ``"omit"``: they are left out
#: of summaries; ``"propagate"``: any undefined correlation makes the summary NaN.
NAN_POLICIES: tuple[str, ...] = ("minus_one", "omit", "propagate")


def _check_policy(nan_policy: str) -> None:
    if nan_policy not in NAN_POLICIES:
        msg = f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}."
        raise InputError(msg)


def _pair(y: np.ndarray, y_hat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=np.float64)
    y_hat = np.asarray(y_hat, dtype=np.float64)
    if y.ndim != 2 or y.shape != y_hat.shape:
        msg = f"y and y_hat must be 2-d arrays of the same shape (units × genes); got {y.shape} and {y_hat.shape}."
        raise InputError(msg)
    return y, y_hat


#: Ranges up to this many float32 ulps of a slice's magnitude count as constant.
CONSTANT_ULPS = 16


def _is_constant(x: np.ndarray, axis: int) -> np.ndarray:
    scale = np.abs(x).max(axis=axis)
    return np.ptp(x, axis=axis) <= CONSTANT_ULPS * np.finfo(np.float32).eps * scale


def _pearson_along(a: np.ndarray, b: np.ndarray, axis: int) -> np.ndarray:
    """Pearson correlation of matching slices along ``axis``; NaN where either slice is constant or too short."""
    n = a.shape[axis]
    da = a - a.mean(axis=axis, keepdims=True)
    db = b - b.mean(axis=axis, keepdims=True)
    num = (da * db).sum(axis=axis)
    den = np.sqrt((da * da).sum(axis=axis) * (db * db).sum(axis=axis))
    # A constant slice has no defined correlation. Maps and tables are float32, and aggregating a constant map
    # over units of different pixel counts leaves a few ulps of rounding: a range within that is constant too
    # (a correlation of rounding noise is not a measurement).
    constant = (_is_constant(a, axis) | _is_constant(b, axis)) if n > 0 else np.ones(num.shape, bool)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = num / den
    r = np.clip(r, -1.0, 1.0)
    r[constant | (n < 2) | ~np.isfinite(r)] = np.nan
    return r


def _apply_policy(values: np.ndarray, nan_policy: str) -> np.ndarray:
    _check_policy(nan_policy)
    values = np.asarray(values, dtype=np.float64)
    if nan_policy == "minus_one":
        return np.nan_to_num(values, nan=-1.0)
    if nan_policy == "omit":
        return values[np.isfinite(values)]
    return values


def genewise_pcc(y: np.ndarray, y_hat: np.ndarray, *, nan_policy: NanPolicy = "minus_one") -> np.ndarray:
    """Pearson correlation of each gene (column) across units.

    Parameters
    ----------
    y
        Measured values, ``(n_units, n_genes)``.
    y_hat
        Predicted values, same shape.
    nan_policy
        ``"minus_one"`` replaces undefined correlations (a constant column) by −1, as the published code does;
        ``"omit"`` and ``"propagate"`` keep them as NaN (the summaries then drop or propagate them).

    Returns
    -------
    One correlation per gene, ``(n_genes,)``.
    """
    _check_policy(nan_policy)
    y, y_hat = _pair(y, y_hat)
    r = _pearson_along(y, y_hat, axis=0)
    return np.nan_to_num(r, nan=-1.0) if nan_policy == "minus_one" else r


def genewise_spearman(y: np.ndarray, y_hat: np.ndarray, *, nan_policy: NanPolicy = "minus_one") -> np.ndarray:
    """Spearman rank correlation of each gene across units (average ranks for ties); see :func:`genewise_pcc`."""
    from scipy.stats import rankdata

    _check_policy(nan_policy)
    y, y_hat = _pair(y, y_hat)
    if y.shape[0] == 0:
        r = np.full(y.shape[1], np.nan)
    else:
        r = _pearson_along(rankdata(y, axis=0), rankdata(y_hat, axis=0), axis=0)
    return np.nan_to_num(r, nan=-1.0) if nan_policy == "minus_one" else r


def spotwise_pcc(y: np.ndarray, y_hat: np.ndarray, *, nan_policy: NanPolicy = "minus_one") -> np.ndarray:
    """MagNet's spot-wise PCC: the correlation across genes within each unit (row), one value per unit.

    MagNet (``Junchao-Zhu/MagNet:models/losses.py:calculate_pcc``) averages these over the units of a held-out
    slide. The quantity rewards the ranking of genes within a unit, which is dominated by differences in mean
    expression between genes; it is **not** comparable with the gene-wise PCC@M.
    """
    _check_policy(nan_policy)
    y, y_hat = _pair(y, y_hat)
    r = _pearson_along(y, y_hat, axis=1)
    return np.nan_to_num(r, nan=-1.0) if nan_policy == "minus_one" else r


def mse(y: np.ndarray, y_hat: np.ndarray) -> float:
    """Mean squared error over all ``n_units × n_genes`` entries."""
    y, y_hat = _pair(y, y_hat)
    return float(np.mean((y - y_hat) ** 2)) if y.size else float("nan")


def mae(y: np.ndarray, y_hat: np.ndarray) -> float:
    """Mean absolute error over all ``n_units × n_genes`` entries."""
    y, y_hat = _pair(y, y_hat)
    return float(np.mean(np.abs(y - y_hat))) if y.size else float("nan")


def pcc_summary(pcc: np.ndarray, *, nan_policy: NanPolicy = "minus_one") -> dict[str, float]:
    """PCC@F (first quartile), PCC@S (median) and PCC@M (mean) of per-gene correlations.

    Quartiles use numpy's default (linear interpolation), as ``np.quantile`` in the reference code.
    With ``nan_policy="omit"`` undefined correlations are dropped; with ``"propagate"`` any NaN gives NaN.
    """
    values = _apply_policy(pcc, nan_policy)
    if values.size == 0:
        return {"pcc_f": float("nan"), "pcc_s": float("nan"), "pcc_m": float("nan")}
    return {
        "pcc_f": float(np.quantile(values, 0.25)),
        "pcc_s": float(np.median(values)),
        "pcc_m": float(np.mean(values)),
    }


def policy_mean(values: np.ndarray, *, nan_policy: NanPolicy = "minus_one") -> float:
    """Mean of correlations under ``nan_policy`` (NaN for an empty selection)."""
    values = _apply_policy(values, nan_policy)
    return float(np.mean(values)) if values.size else float("nan")


def grid_raster_index(rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Raster cell of each unit: grid indices shifted to start at 0.

    A hexagonal Visium-style grid, where ``array_row + array_col`` has one parity for every unit (columns step
    by 2 within a row), is compacted to ``array_col // 2`` so that neighbouring units are neighbouring cells.
    """
    r = np.asarray(rows, dtype=np.int64)
    c = np.asarray(cols, dtype=np.int64)
    if r.size and np.unique((r + c) % 2).size == 1 and np.unique(c % 2).size == 2:
        c = c // 2
    if r.size:
        r = r - r.min()
        c = c - c.min()
    return r, c


def grid_ssim(
    y: np.ndarray,
    y_hat: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    *,
    win_size: int = 7,
) -> np.ndarray:
    """Structural similarity of each gene rasterised on the units' grid.

    Each gene's measured and predicted values are scaled jointly to ``[0, 1]`` (one min and max over both)
    and placed on a raster at the units' grid cells (:func:`grid_raster_index`); cells without a unit are 0
    in both. :func:`skimage.metrics.structural_similarity` (``data_range=1``, ``full=True``) gives the local
    SSIM map, which is averaged over the cells that hold a unit, away from the ``(win_size - 1) // 2`` border
    skimage also leaves out (over all unit cells if none is that far in). On a fully occupied grid this is
    exactly skimage's mean SSIM; empty cells never count. The window is ``win_size``, shrunk to the largest
    odd size that fits the raster; a raster narrower than 3 cells, or a gene constant on both sides, gives NaN.

    Parameters
    ----------
    y, y_hat
        ``(n_units, n_genes)`` arrays.
    rows, cols
        Integer grid indices of the units (``array_row``, ``array_col``), unique pairs.
    win_size
        Side of the SSIM window (odd).

    Returns
    -------
    One SSIM value per gene.
    """
    from skimage.metrics import structural_similarity

    y, y_hat = _pair(y, y_hat)
    rows = np.asarray(rows, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    if rows.shape != (y.shape[0],) or cols.shape != (y.shape[0],):
        msg = "rows and cols must hold one grid index per unit."
        raise InputError(msg)
    out = np.full(y.shape[1], np.nan)
    if y.shape[0] == 0:
        return out
    r, c = grid_raster_index(rows, cols)
    shape = (int(r.max()) + 1, int(c.max()) + 1)
    win = min(win_size, *shape)
    win = win if win % 2 == 1 else win - 1
    if win < 3:
        return out
    occupied = np.zeros(shape, dtype=bool)
    occupied[r, c] = True
    pad = (win - 1) // 2
    inner = np.zeros(shape, dtype=bool)
    inner[pad : shape[0] - pad, pad : shape[1] - pad] = True
    cells = occupied & inner if (occupied & inner).any() else occupied
    for g in range(y.shape[1]):
        lo = min(y[:, g].min(), y_hat[:, g].min())
        hi = max(y[:, g].max(), y_hat[:, g].max())
        if hi <= lo:
            continue
        a = np.zeros(shape)
        b = np.zeros(shape)
        a[r, c] = (y[:, g] - lo) / (hi - lo)
        b[r, c] = (y_hat[:, g] - lo) / (hi - lo)
        _, local = structural_similarity(a, b, win_size=win, data_range=1.0, full=True)
        out[g] = float(local[cells].mean())
    return out


def highly_predictive_genes(
    fold_pcc: Sequence[pd.Series | Mapping[str, float]] | pd.DataFrame,
    *,
    n: int = 50,
) -> list[str]:
    """TRIPLEX's highly predictive genes (HPG): the top ``n`` genes by PCC rank averaged over folds.

    Follows ``NEXGEM/TRIPLEX``: for each fold, genes are ranked by their gene-wise PCC in ascending order
    (``argsort(argsort(pcc)) + 1``, so the best gene has the highest rank; ``model_interface.py``), the ranks
    are averaged over folds and the ``n`` genes with the highest mean rank are kept (``get_HPG.py``).
    Undefined correlations rank as −1. PCC@H, the mean PCC over these genes, is a TRIPLEX metric; PixNet does
    not report it.

    Parameters
    ----------
    fold_pcc
        One per-gene PCC series per fold (index = gene names), or a DataFrame with genes as rows and folds as
        columns. Only genes present in every fold are ranked.
    n
        How many genes to keep.

    Returns
    -------
    Gene names, best first.
    """
    if isinstance(fold_pcc, pd.DataFrame):
        folds = [fold_pcc[col] for col in fold_pcc.columns]
    else:
        folds = [pd.Series(f, dtype=np.float64) if not isinstance(f, pd.Series) else f for f in fold_pcc]
    if not folds:
        msg = "highly_predictive_genes needs the per-gene PCC of at least one fold."
        raise InputError(msg)
    if n < 1:
        msg = f"n must be a positive number of genes, got {n}."
        raise InputError(msg)
    common = folds[0].index
    for fold in folds[1:]:
        common = common.intersection(fold.index, sort=False)
    if len(common) == 0:
        msg = "The folds share no gene; pass per-gene PCC series indexed by gene name."
        raise InputError(msg)
    ranks = []
    for fold in folds:
        values = np.nan_to_num(fold.loc[common].to_numpy(dtype=np.float64), nan=-1.0)
        ranks.append(np.argsort(np.argsort(values, kind="stable"), kind="stable") + 1)
    mean_rank = np.mean(ranks, axis=0)
    order = np.argsort(-mean_rank, kind="stable")[:n]
    return [str(g) for g in common[order]]
