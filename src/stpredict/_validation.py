"""Checks on user data shared by readers, preprocessing and models; errors name the fix."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import sparse

from ._errors import InputError

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["check_gene_names", "check_raw_counts"]


def check_raw_counts(X: Any, *, name: str = "counts", integer: bool = True) -> None:
    """Raise :class:`InputError` unless ``X`` (dense or sparse) holds finite, non-negative integers.

    Parameters
    ----------
    X
        Matrix of raw counts, units × genes.
    name
        What ``X`` is, for the message.
    integer
        ``False`` accepts non-integer values (expected counts, e.g. a density map summed over units).
    """
    values = X.data if sparse.issparse(X) else np.asarray(X)
    if values.dtype.kind not in "biuf":
        msg = f"{name} must be numeric, got dtype {values.dtype}. Convert it, e.g. `X.astype(np.float32)`."
        raise InputError(msg)
    if values.size == 0:
        return
    if values.dtype.kind == "f":
        if not np.all(np.isfinite(values)):
            n_bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
            msg = f"{name} contain {n_bad} NaN or infinite values; raw counts are required. Drop or fill them first."
            raise InputError(msg)
        if integer and not np.all(values == np.round(values)):
            msg = (
                f"{name} contain non-integer values; raw counts are required. Pass the raw UMI counts "
                "(e.g. `adata.layers['counts']` or `adata.raw`), not normalised data."
            )
            raise InputError(msg)
    if values.min() < 0:
        msg = f"{name} contain negative values (min {values.min()}); raw counts are required."
        raise InputError(msg)


def check_gene_names(names: Sequence[Any] | pd.Index, *, name: str = "gene names") -> None:
    """Raise :class:`InputError` if ``names`` has missing, empty or duplicated entries."""
    index = pd.Index(names)
    missing = index.isna() | (index.astype(str).str.strip() == "")
    if missing.any():
        msg = (
            f"{int(missing.sum())} {name} are missing or empty. Every gene needs a name; fill them, "
            "e.g. from a gene-id column."
        )
        raise InputError(msg)
    if index.has_duplicates:
        dups = index[index.duplicated()].unique()[:5].tolist()
        msg = (
            f"{name} are duplicated (e.g. {dups}). Make them unique, e.g. `adata.var_names_make_unique()`, "
            "or sum the duplicated genes."
        )
        raise InputError(msg)
