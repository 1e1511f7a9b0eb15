"""Gene selection fitted on some sections and applied to others (SPEC §1.2)."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from scipy import sparse

from stpredict._errors import InputError
from stpredict._keys import Keys
from stpredict._logging import get_logger
from stpredict._validation import check_gene_names, check_raw_counts

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = ["as_sections", "select_genes", "subset_genes"]

logger = get_logger(__name__)


def _table(item: Any, table_key: str) -> AnnData:
    from anndata import AnnData

    if isinstance(item, AnnData):
        return item
    tables = getattr(item, "tables", None)
    if tables is None:
        msg = f"Expected an AnnData or a SpatialData, got {type(item).__name__}."
        raise TypeError(msg)
    if table_key not in tables:
        msg = f"No table {table_key!r} in the SpatialData; available tables: {sorted(tables)}. Pass `table_key=`."
        raise KeyError(msg)
    return tables[table_key]


def as_sections(data: Any, *, table_key: str = Keys.table, section_key: str | None = None) -> dict[Any, AnnData]:
    """Normalise the ways to pass several sections into ``{section id: table}``.

    Parameters
    ----------
    data
        One AnnData or SpatialData (one section, id ``0``; or several if ``section_key`` is given), a sequence
        of them (ids ``0, 1, …``), or a mapping ``{name: AnnData | SpatialData}`` (ids = the names).
    table_key
        Table of each SpatialData.
    section_key
        With a single table: the ``obs`` column that names the section of each unit (ids = its values).

    Returns
    -------
    Section id → AnnData (views for ``section_key``).
    """
    if isinstance(data, Mapping):
        return {k: _table(v, table_key) for k, v in data.items()}
    if isinstance(data, Sequence) and not isinstance(data, str):
        return {i: _table(v, table_key) for i, v in enumerate(data)}
    table = _table(data, table_key)
    if section_key is None:
        return {0: table}
    if section_key not in table.obs:
        msg = f"No column {section_key!r} in obs; available columns: {list(table.obs.columns)}."
        raise KeyError(msg)
    values = table.obs[section_key]
    return {s: table[np.asarray(values == s)] for s in pd.unique(values)}


def _fit_ids(sections: dict[Any, AnnData], fit_on: Any) -> list[Any]:
    if fit_on is None or (isinstance(fit_on, str) and fit_on == "all"):
        return list(sections)
    if isinstance(fit_on, str):
        msg = (
            f"fit_on={fit_on!r} is not understood. Pass 'all' (or None), or the ids of the training sections, "
            "e.g. `fit_on=fold.train` from `st.pp.make_folds`."
        )
        raise InputError(msg)
    ids = list(fit_on)
    if len(ids) == len(sections) and all(isinstance(v, (bool, np.bool_)) for v in ids):
        ids = [k for k, keep in zip(sections, ids, strict=True) if keep]
    unknown = [i for i in ids if i not in sections]
    if unknown:
        msg = f"fit_on names sections {unknown} that are not in the data; known section ids: {list(sections)}."
        raise InputError(msg)
    if not ids:
        msg = "fit_on selects no section; pass at least one training section."
        raise InputError(msg)
    return ids


def _counts(table: AnnData, layer: str | None) -> Any:
    if layer is None:
        return table.X
    if layer not in table.layers:
        msg = f"No layer {layer!r}; available layers: {list(table.layers)}."
        raise KeyError(msg)
    return table.layers[layer]


def select_genes(
    data: Any,
    *,
    n_top: int = 250,
    method: Literal["mean", "highly_variable"] = "mean",
    fit_on: Any = None,
    layer: str | None = None,
    table_key: str = Keys.table,
    section_key: str | None = None,
) -> list[str]:
    """Choose the genes to predict, fitted on some sections.

    ``method="mean"`` is the ST-Net convention (SPEC §1.2): the ``n_top`` genes with the highest mean raw count,
    the mean taken over all units of all fitted sections pooled (EGN's ``v1/dataset.py``).
    ``method="highly_variable"`` ranks genes by the variance of their analytic Pearson residuals on raw counts
    (:func:`scanpy.experimental.pp.highly_variable_genes`, ``flavor="pearson_residuals"``, ``theta=100``),
    computed by scanpy for each fitted section and combined across sections as scanpy combines batches: the
    number of sections in which a gene is among the ``n_top`` most variable, then its median rank there. Unlike
    scanpy's ``batch_key`` (scverse/scanpy#4138), each section's residuals are clipped at ``sqrt`` of its own
    number of units, so the choice does not depend on the sections' order. It stands in for scanpy's
    ``seurat_v3`` flavour, which needs the optional ``scikit-misc`` package.

    Only genes measured in every fitted section are candidates (a gene missing from a training section cannot be
    learnt there). Apply the list to any section, fitted or not, with :func:`subset_genes`, which zero-fills
    genes a section lacks.

    Parameters
    ----------
    data
        The sections: see :func:`as_sections` (an AnnData/SpatialData, a list, or a ``{name: …}`` mapping).
    n_top
        Number of genes.
    method
        ``"mean"`` or ``"highly_variable"``.
    fit_on
        Which sections to fit on. ``None`` or ``"all"``: every section in ``data`` (SPEC's ``fit_on="all"``,
        the EGN/SGN convention, which leaks test sections into the choice). Otherwise the ids of the
        training sections (list positions, mapping keys or ``section_key`` values; e.g. ``fold.train`` from
        :func:`stpredict.pp.make_folds`) or a boolean mask over the sections: SPEC's ``fit_on="train"``.
    layer
        Layer with the raw counts; ``None`` uses ``X``.
    table_key
        Table of each SpatialData.
    section_key
        With a single table: the ``obs`` column naming each unit's section.

    Returns
    -------
    The selected gene names, best first (ties broken by name).

    Raises
    ------
    InputError
        If counts are not raw counts, gene names are missing or duplicated, or fewer than ``n_top`` genes are
        shared by the fitted sections.
    """
    if method not in ("mean", "highly_variable"):
        msg = f"method must be 'mean' or 'highly_variable', got {method!r}."
        raise InputError(msg)
    if n_top < 1:
        msg = f"n_top must be at least 1, got {n_top}."
        raise InputError(msg)
    sections = as_sections(data, table_key=table_key, section_key=section_key)
    ids = _fit_ids(sections, fit_on)
    fitted = [sections[i] for i in ids]
    for sid, table in zip(ids, fitted, strict=True):
        check_gene_names(table.var_names, name=f"gene names of section {sid!r}")
        check_raw_counts(_counts(table, layer), name=f"counts of section {sid!r}")
    shared = fitted[0].var_names
    for table in fitted[1:]:
        shared = shared.intersection(table.var_names, sort=False)
    n_union = len(pd.Index(np.concatenate([t.var_names.to_numpy() for t in fitted])).unique())
    if len(shared) < n_union:
        logger.info("%d of %d genes are measured in every fitted section.", len(shared), n_union)
    if len(shared) < n_top:
        msg = (
            f"Only {len(shared)} genes are measured in every fitted section, fewer than n_top={n_top}. "
            "Lower n_top, or fit on sections with more shared genes."
        )
        raise InputError(msg)

    n_units = sum(table.n_obs for table in fitted)
    if n_units == 0:
        msg = "The fitted sections hold no units; fit on sections with measured units (`fit_on=`)."
        raise InputError(msg)
    if method == "mean":
        total = np.zeros(len(shared), dtype=np.float64)
        for table in fitted:
            counts = _counts(table, layer)[:, table.var_names.get_indexer(shared)]
            total += np.asarray(counts.sum(axis=0), dtype=np.float64).ravel()
        score = total / n_units
        order = np.lexsort((shared.to_numpy().astype(str), -score))
    else:
        order = _highly_variable_order(fitted, shared, layer, n_top)
    genes = [str(g) for g in shared[order[:n_top]]]
    logger.info("Selected %d genes by %s over %d sections.", len(genes), method, len(fitted))
    return genes


#: Overdispersion of the null model of analytic Pearson residuals (scanpy's default).
PEARSON_THETA = 100.0


def _residual_variances(counts: Any) -> np.ndarray:
    """Per-gene variance of the clipped analytic Pearson residuals of one section, from scanpy.

    :func:`scanpy.experimental.pp.highly_variable_genes` (``flavor="pearson_residuals"``, no batches): residuals
    clipped at ``±sqrt(n_units)`` (Lause et al. 2021), genes without counts give 0. Scanpy's numba kernel makes one
    pass over the sparse counts per gene. It replaced a NumPy copy that chose the same genes but took 19-29 s
    where scanpy takes 7-15 s (three sections of 20,000 units × 5,000 genes, 2 busy cores), and that needed a
    dense units × 2,048 float64 block (8 GB for a 500,000-bin Visium HD section).
    """
    import anndata as ad
    import scanpy as sc

    n_genes = counts.shape[1]
    if counts.shape[0] == 0:
        return np.zeros(n_genes)
    table = ad.AnnData(
        counts,
        obs=pd.DataFrame(index=pd.RangeIndex(counts.shape[0]).astype(str)),
        var=pd.DataFrame(index=pd.RangeIndex(n_genes).astype(str)),
    )
    df = sc.experimental.pp.highly_variable_genes(
        table,
        flavor="pearson_residuals",
        theta=PEARSON_THETA,
        n_top_genes=1,  # the ranking is ours (per batch, below); only the variances are used
        check_values=False,  # select_genes has checked for raw counts, with an error that says what to do
        inplace=False,
    )
    return df["residual_variances"].to_numpy(dtype=np.float64)


def _highly_variable_order(fitted: list[AnnData], shared: pd.Index, layer: str | None, n_top: int) -> np.ndarray:
    """Gene order of scanpy's ``highly_variable_genes(flavor="pearson_residuals", batch_key=section)``.

    Genes are ranked by residual variance within each section; the order is: number of sections in which a
    gene is in the top ``n_top`` (descending), then its median rank over those sections (scanpy's rule), then
    its name. Each section is passed to scanpy on its own rather than as a batch of one pooled table: scanpy
    (up to at least 1.11) clips every batch's residuals at ``sqrt(n)`` of the first batch in sorted label order,
    not of its own (scverse/scanpy#4138), so the genes would depend on the sections' order and names. With
    sections of equal size the two agree.
    """
    variances = np.stack([_residual_variances(_counts(t, layer)[:, t.var_names.get_indexer(shared)]) for t in fitted])
    ranks = np.argsort(np.argsort(-variances, axis=1, kind="stable"), axis=1).astype(np.float64)
    n_batches = (ranks < n_top).sum(axis=0)
    ranks[ranks >= n_top] = np.nan
    median_rank = np.full(len(shared), np.inf)
    selected = n_batches > 0
    median_rank[selected] = np.nanmedian(ranks[:, selected], axis=0)
    return np.lexsort((shared.to_numpy().astype(str), median_rank, -n_batches))


def subset_genes(
    data: AnnData,
    *,
    genes: Sequence[str],
    missing: Literal["zeros", "raise"] = "zeros",
) -> AnnData:
    """A copy of ``data`` restricted to ``genes``, in that order.

    Genes the table lacks become all-zero columns (``missing="zeros"``, with a warning that counts them) or
    raise (``missing="raise"``). ``obs``, ``obsm``, ``uns`` and layers are kept; layers get zero columns too.

    Parameters
    ----------
    data
        A table (e.g. one test section).
    genes
        Gene names, e.g. from :func:`select_genes`.
    missing
        What to do with genes the table lacks.

    Returns
    -------
    A new AnnData; ``data`` is not modified. ``var["stpredict_missing"]`` marks zero-filled genes.
    """
    import anndata as ad

    check_gene_names(data.var_names)
    genes = pd.Index([str(g) for g in genes])
    check_gene_names(genes, name="requested genes")
    if missing not in ("zeros", "raise"):
        msg = f"missing must be 'zeros' or 'raise', got {missing!r}."
        raise InputError(msg)
    position = data.var_names.get_indexer(genes)
    absent = position < 0
    if absent.any():
        examples = genes[absent][:5].tolist()
        if missing == "raise":
            msg = (
                f"{int(absent.sum())} of {len(genes)} genes are not in the table (e.g. {examples}). Pass "
                "`missing='zeros'` to fill them with zeros, or select genes measured in every section."
            )
            raise InputError(msg)
        logger.warning(
            "%d of %d genes are not measured in this table (e.g. %s); filled with zeros.",
            int(absent.sum()),
            len(genes),
            examples,
        )

    take_at = np.where(absent, data.n_vars, position)  # absent genes read an appended zero column

    def take(matrix: Any) -> Any:
        if sparse.issparse(matrix):
            padded = sparse.hstack([sparse.csr_matrix(matrix), sparse.csr_matrix((data.n_obs, 1))], format="csr")
            return padded.astype(matrix.dtype)[:, take_at]
        dense = np.asarray(matrix)
        return np.concatenate([dense, np.zeros((data.n_obs, 1), dtype=dense.dtype)], axis=1)[:, take_at]

    var = data.var.reindex(genes) if not absent.any() else pd.DataFrame(index=genes)
    var["stpredict_missing"] = absent
    return ad.AnnData(
        X=None if data.X is None else take(data.X),
        obs=data.obs.copy(),
        var=var,
        obsm={k: np.array(v, copy=True) if isinstance(v, np.ndarray) else v.copy() for k, v in data.obsm.items()},
        layers={k: take(v) for k, v in data.layers.items()},
        uns=copy.deepcopy(dict(data.uns)),
    )
