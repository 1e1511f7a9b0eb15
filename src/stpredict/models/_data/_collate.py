"""Collate functions: stack tiles (with block-diagonal sparse footprint weights) or unit crops into batches."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import sparse

if TYPE_CHECKING:
    import torch

__all__ = ["collate_tiles", "collate_units", "sparse_weights"]


def collate_tiles(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tiles; per table, the block-diagonal weights over the whole batch (COO parts) and the targets.

    Each table's entry is ``None`` when no tile of the batch holds a complete unit of it, else a dict with
    ``indices (2, nnz)``, ``values (nnz,)``, ``shape (2,)`` and ``targets (units, genes)``; :func:`sparse_weights`
    turns the first three into the sparse matrix.
    """
    import torch

    images = torch.from_numpy(np.stack([it["image"] for it in items]))
    n_pix = items[0]["tables"][0][0].shape[1] if items[0]["tables"] else 0
    tables = []
    for t in range(len(items[0]["tables"])):
        blocks = [it["tables"][t][0] for it in items]
        stacked = sparse.block_diag(blocks, format="coo") if blocks else None
        targets = np.concatenate([it["tables"][t][1] for it in items], axis=0)
        if stacked is None or stacked.shape[0] == 0:
            tables.append(None)
            continue
        # Plain tensors (not a torch sparse tensor) cross worker processes and devices safely; see sparse_weights.
        indices = torch.from_numpy(np.vstack([stacked.row, stacked.col]).astype(np.int64))
        values = torch.from_numpy(stacked.data.astype(np.float32))
        shape = torch.tensor([stacked.shape[0], len(items) * n_pix], dtype=torch.long)
        targets_t = torch.from_numpy(np.ascontiguousarray(targets, dtype=np.float32))
        tables.append({"indices": indices, "values": values, "shape": shape, "targets": targets_t})
    return {"image": images, "tables": tables}


def sparse_weights(entry: dict[str, torch.Tensor]) -> torch.Tensor:
    """The sparse COO weight matrix ``(units, batch·h·w)`` of one table of a collated batch, on its device."""
    import torch

    size = tuple(int(v) for v in entry["shape"])
    return torch.sparse_coo_tensor(
        entry["indices"], entry["values"], size, device=entry["values"].device, check_invariants=False
    ).coalesce()


def collate_units(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack unit crops, their table index and targets."""
    import torch

    return {
        "image": torch.from_numpy(np.stack([it["image"] for it in items])),
        "table": torch.tensor([it["table"] for it in items], dtype=torch.long),
        "target": torch.from_numpy(np.stack([it["target"] for it in items]).astype(np.float32)),
    }
