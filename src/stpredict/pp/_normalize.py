"""Target normalisation (SPEC §1.3), fitted on training tables and applied unchanged to test tables."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from scipy import sparse

from stpredict._errors import InputError
from stpredict._keys import Attrs
from stpredict._logging import get_logger
from stpredict._validation import check_gene_names, check_raw_counts

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anndata import AnnData

__all__ = ["fit_normalize", "inverse_normalize", "normalize", "smooth_grid"]

logger = get_logger(__name__)

Method = Literal["log1p_cpm", "log10_minmax", "prop_log"]
_METHODS = ("log1p_cpm", "log10_minmax", "prop_log")
#: ``normalize_total`` target of ``log1p_cpm`` (TRIPLEX).
CPM_TARGET_SUM = 1e4
#: Denominator guard of ``log10_minmax`` (EGN).
MINMAX_EPS = 1e-8


def _counts(adata: AnnData, layer: str | None) -> Any:
    if layer is None:
        return adata.X
    if layer not in adata.layers:
        msg = f"No layer {layer!r}; available layers: {list(adata.layers)}."
        raise KeyError(msg)
    return adata.layers[layer]


def _dense(matrix: Any) -> np.ndarray:
    return np.asarray(matrix.toarray() if sparse.issparse(matrix) else matrix, dtype=np.float64)


def is_expected_counts(adata: AnnData) -> bool:
    """Whether ``X`` holds expected counts: a density map summed over units by :func:`stpredict.tl.aggregate`."""
    record = adata.uns.get(Attrs.root, {})
    return (
        isinstance(record, dict)
        and record.get("value_kind") == "density"
        and record.get("reduce") == "sum"
        and record.get("sum_unit") == "um2"
    )


def _check(adata: AnnData, layer: str | None) -> None:
    check_gene_names(adata.var_names)
    expected = layer is None and is_expected_counts(adata)
    name = ("expected counts" if expected else "counts") if layer is None else f"layer {layer!r}"
    check_raw_counts(_counts(adata, layer), name=name, integer=not expected)


def fit_normalize(
    adatas: AnnData | Sequence[AnnData],
    *,
    method: Method = "log1p_cpm",
    layer: str | None = None,
    smooth: bool = False,
) -> dict[str, Any]:
    """Fit the parameters of a normalisation on one or more (training) tables.

    Parameters
    ----------
    adatas
        Training tables with raw counts; all units of all tables are pooled.
    method
        See :func:`normalize`.
    layer
        Layer with the raw counts; ``None`` uses ``X``.
    smooth
        ``log1p_cpm`` only: average each unit with its 3 × 3 grid neighbours afterwards.

    Returns
    -------
    A JSON-serialisable record: ``method``, ``layer``, ``smooth`` and the fitted constants
    (``target_sum`` for ``log1p_cpm``; ``genes``, ``min``, ``max`` for ``log10_minmax``; ``scale`` for ``prop_log``).
    """
    from anndata import AnnData

    tables = [adatas] if isinstance(adatas, AnnData) else list(adatas)
    if method not in _METHODS:
        msg = f"method must be one of {list(_METHODS)}, got {method!r}."
        raise InputError(msg)
    if smooth and method != "log1p_cpm":
        msg = "smooth=True belongs to method='log1p_cpm' (TRIPLEX); the other methods do not smooth."
        raise InputError(msg)
    if not tables:
        msg = "fit_normalize needs at least one table."
        raise InputError(msg)
    for table in tables:
        _check(table, layer)
    params: dict[str, Any] = {"method": method, "layer": layer, "smooth": bool(smooth)}
    if method == "log1p_cpm":
        params["target_sum"] = CPM_TARGET_SUM
    elif method == "prop_log":
        totals = np.concatenate([np.asarray(_counts(t, layer).sum(axis=1), dtype=np.float64).ravel() for t in tables])
        scale = float(totals.mean()) if totals.size else 0.0
        if scale <= 0:
            msg = "The training tables hold no counts; prop_log needs a positive mean count per unit."
            raise InputError(msg)
        params["scale"] = scale
    else:
        genes = tables[0].var_names
        for table in tables[1:]:
            if not table.var_names.equals(genes):
                msg = (
                    "log10_minmax fits one min and max per gene, so every training table needs the same genes in "
                    "the same order. Subset them first with `st.pp.subset_genes(adata, genes=genes)`."
                )
                raise InputError(msg)
        lo = np.full(len(genes), np.inf)
        hi = np.full(len(genes), -np.inf)
        for table in tables:
            if table.n_obs == 0:
                continue
            y = np.log10(1.0 + _dense(_counts(table, layer)))
            lo = np.minimum(lo, y.min(axis=0))
            hi = np.maximum(hi, y.max(axis=0))
        if not np.isfinite(lo).all():
            msg = "The training tables hold no units; log10_minmax needs at least one."
            raise InputError(msg)
        params.update(genes=[str(g) for g in genes], min=lo.tolist(), max=hi.tolist())
    return params


def smooth_grid(values: np.ndarray, array_row: np.ndarray, array_col: np.ndarray) -> np.ndarray:
    """Average each unit with the units present in its 3 × 3 neighbourhood on the array grid (TRIPLEX).

    Parameters
    ----------
    values
        ``(n_units, n_genes)``.
    array_row, array_col
        Integer grid indices of each unit.

    Returns
    -------
    The smoothed ``(n_units, n_genes)`` array.
    """
    rows = np.asarray(array_row, dtype=np.int64)
    cols = np.asarray(array_col, dtype=np.int64)
    index = pd.Series(np.arange(len(rows)), index=pd.MultiIndex.from_arrays([rows, cols]))
    if index.index.has_duplicates:
        msg = "Two units share one (array_row, array_col) position; grid smoothing needs unique grid positions."
        raise InputError(msg)
    total = np.zeros_like(values, dtype=np.float64)
    count = np.zeros(len(rows), dtype=np.float64)
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            neighbour = index.reindex(pd.MultiIndex.from_arrays([rows + dr, cols + dc])).to_numpy()
            present = ~np.isnan(neighbour)
            total[present] += values[neighbour[present].astype(np.int64)]
            count += present
    return total / count[:, None]


def scaled_log1p(counts: Any, target: float, *, columns: np.ndarray | None = None) -> np.ndarray:
    """``log1p(x / total · target)`` per unit, in float64; totals over all genes, 0 for units without counts.

    The one implementation behind ``log1p_cpm`` (``target`` = 1e4) and ``prop_log``, for tables here and for
    training targets in :mod:`stpredict.models`. Only ``columns`` (default: all) are densified, so a sparse table
    with many genes stays cheap when few are needed.
    """
    totals = np.asarray(counts.sum(axis=1, dtype=np.float64)).reshape(-1, 1)
    values = _dense(counts if columns is None else counts[:, columns])
    return np.log1p(np.divide(values * target, totals, out=np.zeros_like(values), where=totals > 0))


def _apply(adata: AnnData, params: dict[str, Any]) -> np.ndarray:
    method = params["method"]
    if method in ("log1p_cpm", "prop_log"):
        target = params["target_sum"] if method == "log1p_cpm" else params["scale"]
        values = scaled_log1p(_counts(adata, params["layer"]), target)
        if params.get("smooth"):
            missing = [c for c in ("array_row", "array_col") if c not in adata.obs]
            if missing:
                msg = f"Grid smoothing needs obs columns {missing}; add the array grid indices or pass smooth=False."
                raise InputError(msg)
            values = smooth_grid(values, adata.obs["array_row"].to_numpy(), adata.obs["array_col"].to_numpy())
        return values.astype(np.float32)
    genes = pd.Index(params["genes"])
    if not adata.var_names.equals(genes):
        msg = (
            "This table's genes differ from those the log10_minmax parameters were fitted on. Subset it to the same "
            "genes first: `st.pp.subset_genes(adata, genes=params['genes'])`."
        )
        raise InputError(msg)
    counts = _dense(_counts(adata, params["layer"]))
    lo, hi = np.asarray(params["min"]), np.asarray(params["max"])
    return ((np.log10(1.0 + counts) - lo) / (hi - lo + MINMAX_EPS)).astype(np.float32)


def normalize(
    adata: AnnData | Sequence[AnnData],
    *,
    method: Method = "log1p_cpm",
    params: dict[str, Any] | None = None,
    layer: str | None = None,
    smooth: bool = False,
    key_added: str | None = None,
    copy: bool = False,
) -> AnnData | list[AnnData] | None:
    """Normalise raw counts into prediction targets (SPEC §1.3), keeping the raw counts in ``X``.

    Expected counts are accepted too: a table that :func:`stpredict.tl.aggregate` made by summing a density map
    (expected counts per µm²) over units holds non-integer counts, and is normalised like measured counts, so that
    a density model's predictions and the measurements compare in one space.

    =================  ================================================================================
    ``log1p_cpm``      ``log1p(x / total · 1e4)`` per unit (scanpy ``normalize_total(target_sum=1e4)`` +
                       ``log1p``, TRIPLEX); ``smooth=True`` then averages each unit with the units present
                       in its 3 × 3 neighbourhood of ``obs["array_row"]``/``obs["array_col"]``.
    ``log10_minmax``   ``y = log10(1 + x)``, then per gene ``(y − min) / (max − min + 1e-8)`` with min and max
                       fitted on the training tables only (EGN); test values can fall outside [0, 1].
    ``prop_log``       Proportional fitting then log (PFlog1p): ``log1p(x / total · s)`` with ``s`` the mean
                       total count per unit over the training tables. MagNet's constants are unknown
                       (SPEC §1.3); this choice is ours and differs from ``log1p_cpm`` only in ``s``.
    =================  ================================================================================

    Units with no counts get 0 under ``log1p_cpm`` and ``prop_log``.

    Parameters
    ----------
    adata
        A table with raw counts, or several training tables: their parameters are fitted jointly
        (all units pooled) and each table is normalised with them.
    method
        Normalisation; ignored when ``params`` is given.
    params
        Parameters fitted before, e.g. ``train.uns["stpredict"]["normalize"]["log10_minmax"]``: apply exactly
        those to this (test) table instead of fitting.
    layer
        Layer with the raw counts; ``None`` uses ``X`` (or, with ``params``, the layer recorded in them).
    smooth
        ``log1p_cpm`` only: 3 × 3 grid smoothing (TRIPLEX ``smooth: True``). The window is in array indices:
        on a square ST grid it holds the 8 neighbours; on Visium's hexagonal grid (columns step by 2) it holds
        4 of the 6.
    key_added
        Layer that receives the normalised values; default: the method name.
    copy
        Return normalised copies instead of writing into ``adata``.

    Returns
    -------
    ``None``, or with ``copy=True`` the normalised copy (a list for a list). Written:
    ``adata.layers[key_added]`` (dense float32) and ``adata.uns["stpredict"]["normalize"][key_added]``
    (the parameters, JSON-serialisable; pass them as ``params`` to normalise a test table identically
    and to :func:`inverse_normalize`). ``X`` is left as it is.

    Raises
    ------
    InputError
        If the counts are not raw counts (non-integer outside expected-count tables, negative, NaN), gene names
        are missing or duplicated, or a table's genes differ from those ``params`` were fitted on.
    """
    from anndata import AnnData

    single = isinstance(adata, AnnData)
    tables = [adata] if single else list(adata)
    if params is None:
        params = fit_normalize(tables, method=method, layer=layer, smooth=smooth)
    else:
        params = dict(params)
        if params.get("method") not in _METHODS:
            msg = "params is not a normalisation record; pass `train.uns['stpredict']['normalize'][key]`."
            raise InputError(msg)
        if layer is not None:
            params["layer"] = layer
        for table in tables:
            _check(table, params["layer"])
    key = key_added or params["method"]
    results = [_apply(table, params) for table in tables]  # everything is validated before anything is written
    out = [table.copy() for table in tables] if copy else tables
    for table, values in zip(out, results, strict=True):
        table.layers[key] = values
        table.uns.setdefault(Attrs.root, {}).setdefault("normalize", {})[key] = dict(params)
        logger.info("Added layers[%r] and uns['stpredict']['normalize'][%r].", key, key)
    if not copy:
        return None
    return out[0] if single else out


def inverse_normalize(
    values: np.ndarray, *, params: dict[str, Any], total_counts: np.ndarray | None = None
) -> np.ndarray:
    """Map normalised values back to counts.

    Parameters
    ----------
    values
        ``(n_units, n_genes)`` normalised values (columns in ``params["genes"]`` order for ``log10_minmax``).
    params
        The record written by :func:`normalize`.
    total_counts
        ``log1p_cpm``/``prop_log``: each unit's total count, to undo the per-unit scaling. Without it, counts
        are returned at the fitted total (``target_sum`` or ``scale``) per unit.

    Returns
    -------
    Counts as float64. Grid smoothing is not inverted (it is not invertible); the result is the inverse of
    the unsmoothed transform.
    """
    values = np.asarray(values, dtype=np.float64)
    method = params["method"]
    if method == "log10_minmax":
        lo, hi = np.asarray(params["min"]), np.asarray(params["max"])
        return np.power(10.0, values * (hi - lo + MINMAX_EPS) + lo) - 1.0
    if method not in ("log1p_cpm", "prop_log"):
        msg = f"Unknown normalisation method {method!r} in params."
        raise InputError(msg)
    target = params["target_sum"] if method == "log1p_cpm" else params["scale"]
    counts = np.expm1(values)
    if total_counts is None:
        return counts
    return counts * (np.asarray(total_counts, dtype=np.float64).reshape(-1, 1) / target)
