"""Files in 10x Genomics' own formats, written by the reader tests (imported by name: pytest pythonpath)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import h5py
import numpy as np

if TYPE_CHECKING:
    from collections.abc import Sequence


def write_10x_h5(
    path,
    counts: np.ndarray,
    barcodes: Sequence[str],
    names: Sequence[str],
    *,
    ids: Sequence[str] | None = None,
    feature_types: Sequence[str] | None = None,
    genome: str = "GRCh38",
) -> None:
    """A Space Ranger / Cell Ranger / Xenium feature-barcode matrix (HDF5, CSC features × barcodes).

    ``counts`` is barcodes × features; ``ids`` default to Ensembl-like ids, ``feature_types`` to
    ``"Gene Expression"`` for every feature.
    """
    from scipy import sparse

    n = len(names)
    matrix = sparse.csc_matrix(counts.T)
    with h5py.File(path, "w") as f:
        group = f.create_group("matrix")
        group["barcodes"] = np.array(barcodes, dtype="S")
        group["data"] = matrix.data.astype(np.int32)
        group["indices"] = matrix.indices.astype(np.int64)
        group["indptr"] = matrix.indptr.astype(np.int64)
        group["shape"] = np.array(matrix.shape, dtype=np.int32)
        features = group.create_group("features")
        features["id"] = np.array(ids if ids is not None else [f"ENSG{i:011d}" for i in range(n)], dtype="S")
        features["name"] = np.array(names, dtype="S")
        features["feature_type"] = np.array(feature_types or ["Gene Expression"] * n, dtype="S")
        features["genome"] = np.array([genome] * n, dtype="S")
        features["_all_tag_keys"] = np.array([b"genome"])
