"""MagNet's training data: sections as bin grids with cached context features, and window mini-batches.

A section's measured bins must lie on a regular square grid of the model's bin size (:func:`grid_indices`). Its
context tiles are the cells of two non-overlapping grids anchored at the image origin (the *region* level, 128 µm by
default, and the *spot* level, 56 µm); the tiles around measured bins are encoded once by the frozen context
encoder and cached for the whole fit (SPEC.md §3.3). Tile labels are the sums of the measured bins' raw counts
whose centres fall inside each tile, normalised like the bin targets (SPEC.md §3.2).

A *window* batch holds every grid position inside one or more region tiles plus a halo of bins (the graph's
neighbours at the edge), so that the bin graph joins real neighbours; only measured positions inside the core carry
a loss. With ``faithful=True`` a batch is instead a random set of measured bins (the paper's shuffled loader).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy import sparse

from stpredict._errors import InputError
from stpredict.models._data._sections import Section, _region_of, build_sections
from stpredict.models._data._windows import read_window
from stpredict.models._training._plan import normalize_tiles

from ._geometry import (
    cell_of,
    crop_origins,
    grid_indices,
    knn_edges,
    neighbour_tokens,
    symmetric_knn_edges,
    window_bins,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from spatialdata import SpatialData

__all__ = ["BinSection", "LevelCache", "WindowDataset", "prepare_sections"]

_KEY = np.int64(1) << 32  # grid position (row, col) → one int64 key
#: kNN neighbours of the bin and tile graphs (SPEC §3.6).
K_NEIGHBOURS = 8


def _keys(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    return (rows.astype(np.int64) + (1 << 30)) * _KEY + (cols.astype(np.int64) + (1 << 30))


@dataclass
class LevelCache:
    """Context tiles of one level on one section: cells, cached frozen features and labels."""

    cell: int  # side in model pixels
    cells: np.ndarray  # (m, 2) int64 (col, row) of the global grid
    feats: np.ndarray  # (m, F) float32 pooled context-encoder features
    labels: np.ndarray  # (m, genes) float32 normalised tile labels (0 where unlabelled)
    labelled: np.ndarray  # (m,) bool: the tile holds measured bins


@dataclass
class BinSection:
    """One section as MagNet sees it: its image, the measured bins on their grid and the context caches."""

    section: Section
    f0: float  # full-resolution pixels per model pixel
    origin: tuple[float, float]  # bin grid origin in model pixels (x, y)
    rows: np.ndarray
    cols: np.ndarray
    targets: np.ndarray  # (n, genes) normalised
    order: np.ndarray  # argsort of the bins' keys
    sorted_keys: np.ndarray
    levels: dict[str, LevelCache]
    windows: np.ndarray  # (w, 2) region cells (col, row) that hold measured bins

    def lookup(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Index of the measured bin at each grid position, -1 where none."""
        keys = _keys(rows, cols)
        pos = np.searchsorted(self.sorted_keys, keys)
        pos = np.minimum(pos, len(self.sorted_keys) - 1)
        hit = self.sorted_keys[pos] == keys
        return np.where(hit, self.order[pos], -1)

    def centres(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Model-pixel centres ``(x, y)`` of grid positions."""
        s = self.pitch
        return np.stack([self.origin[0] + (cols + 0.5) * s, self.origin[1] + (rows + 0.5) * s], axis=1)

    pitch: float = 1.0

    def read(self, x0: int, y0: int, side: int) -> np.ndarray:
        """A square of ``side`` model pixels at model pixel ``(x0, y0)``, uint8 ``(3, side, side)``."""
        tile, _, _ = read_window(self.section, x0 * self.f0, y0 * self.f0, side * self.f0, side)
        return np.asarray(tile, dtype=np.uint8)


# ------------------------------------------------------------------------------------------------ preparation
def _tile_labels(
    table: Any, rows: np.ndarray, cell_index: np.ndarray, n_cells: int, genes: Sequence[str], norm: dict[str, Any]
) -> np.ndarray:
    """Normalised sums of the raw counts of the bins (table ``rows``) in each cell, over the model's genes."""
    from anndata import AnnData

    from stpredict.pp._normalize import _apply

    counts = table.X if norm.get("layer") is None else table.layers[norm["layer"]]
    counts = sparse.csr_matrix(counts[rows]) if not sparse.issparse(counts) else counts[rows].tocsr()
    member = sparse.csr_matrix(
        (np.ones(len(rows), dtype=np.float64), (cell_index, np.arange(len(rows)))), shape=(n_cells, len(rows))
    )
    sums = AnnData(member @ counts.astype(np.float64))
    sums.var_names = table.var_names
    params = dict(norm)
    if params.get("method") not in ("log1p_cpm", "prop_log", "log10_minmax"):
        msg = (
            f"The targets' layer {norm.get('layer')!r} has no record of how it was normalised, so the context tiles' "
            "labels cannot be normalised the same way. Write it with `st.pp.normalize(table, method=..., "
            "key_added=...)`, or leave target_layer=None (log1p CPM of the counts in X)."
        )
        raise InputError(msg)
    params["layer"], params["smooth"] = None, False
    values = _apply(sums, params)
    return values[:, table.var_names.get_indexer(list(genes))].astype(np.float32)


def prepare_sections(
    model: Any,
    data: SpatialData | Sequence[SpatialData],
    *,
    image_key: str,
    table_key: str,
    shapes_key: str | None,
    target_layer: str | None,
    normalization: dict[str, Any],
    show_progress_bar: bool = False,
) -> list[BinSection]:
    """Bins, tile labels and cached context features of every section (the context encoder runs once here)."""
    sdatas = [data] if not isinstance(data, list | tuple) else list(data)
    sections = build_sections(
        sdatas,
        image_key=image_key,
        table_keys=[table_key],
        shapes_key=shapes_key,
        genes=model.var_names,
        space="normalised",
        target_layer=target_layer,
    )
    out = []
    for sdata, section in zip(sdatas, sections, strict=True):
        units = section.units[0]
        f0 = model.um_per_px / section.image_um_per_px
        pitch = model.bin_px
        half = units.half_sizes.mean() * 2 / f0
        if not np.isclose(half, pitch, rtol=0.05):
            msg = (
                f"Table {table_key!r} holds bins of {half * model.um_per_px:.3g} µm, but this MagNet predicts "
                f"{model.bin_um:g} µm bins. Bin the 2 µm bins to {model.bin_um:g} µm with "
                f"`st.pp.bin_counts(sdata, bin_size={model.bin_um:g})`, or build MagNet(bin_um=...) for these bins."
            )
            raise InputError(msg)
        centres = units.centers / f0
        rows, cols, origin = grid_indices(centres, pitch)
        _check_inside(sdata, image_key, section, centres, f0, model)
        table = sdata.tables[table_key]
        skey, region_key, _ = _region_of(table, table_key, shapes_key)
        table_rows = np.flatnonzero(table.obs[region_key].astype(str).to_numpy() == skey)
        keys = _keys(rows, cols)
        order = np.argsort(keys, kind="stable")
        bs = BinSection(section, f0, origin, rows, cols, units.targets, order, keys[order], {}, np.zeros((0, 2)))
        bs.pitch = float(pitch)
        exact = bs.centres(rows, cols)
        for level, cell in (("region", model.region_px), ("spot", model.spot_px)):
            bin_cells = cell_of(exact, cell)
            cells, index = np.unique(bin_cells, axis=0, return_inverse=True)
            index = index.ravel()
            labels = _tile_labels(table, table_rows, index, len(cells), model.var_names, normalization)
            if model.n_tokens > 1:  # the 3 × 3 neighbourhood of every tile with bins, for the attention tokens
                offsets = np.array([(dx, dy) for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
                around = np.unique((cells[:, None, :] + offsets[None]).reshape(-1, 2), axis=0)
                extra = around[neighbour_tokens(around, cells, radius=0)[:, 0] < 0]
                cells = np.concatenate([cells, extra])
                labels = np.concatenate([labels, np.zeros((len(extra), labels.shape[1]), np.float32)])
            labelled = np.zeros(len(cells), dtype=bool)
            labelled[: len(np.unique(index))] = True
            feats = encode_cells(model, bs, cells, cell, show_progress_bar=show_progress_bar, what=level)
            bs.levels[level] = LevelCache(cell, cells.astype(np.int64), feats, labels, labelled)
        bs.windows = np.unique(cell_of(exact, model.region_px), axis=0)
        out.append(bs)
    return out


def _check_inside(sdata: Any, image_key: str, section: Section, centres: np.ndarray, f0: float, model: Any) -> None:
    h, w = (int(v) for v in section.levels[0].shape[-2:])
    size = np.array([w, h]) / f0
    if (size < model.region_px).any():
        msg = (
            f"Image {image_key!r} is {size[0] * model.um_per_px:.0f} × {size[1] * model.um_per_px:.0f} µm, smaller "
            f"than one region tile ({model.region_um:g} µm); use a smaller `region_um` for such a small image."
        )
        raise InputError(msg)
    outside = ((centres < 0) | (centres >= size)).any(axis=1)
    if outside.any():
        first = centres[np.flatnonzero(outside)[0]] * model.um_per_px
        msg = (
            f"{int(outside.sum())} bins lie outside image {image_key!r} (e.g. at x={first[0]:.0f} µm, "
            f"y={first[1]:.0f} µm); check that the bins and the image share a coordinate system, or subset the "
            "table to the bins over the image."
        )
        raise InputError(msg)


@torch.no_grad()
def encode_cells(
    model: Any, bs: BinSection, cells: np.ndarray, cell: int, *, show_progress_bar: bool = False, what: str = ""
) -> np.ndarray:
    """Frozen context features of grid cells ``(col, row)`` of side ``cell`` model pixels (read, then encoded)."""
    from tqdm.auto import tqdm

    module = model.module
    device = next(module.context_encoder.parameters()).device
    feats = np.zeros((len(cells), module.context_features), dtype=np.float32)
    batch = max(1, int(2**22 // (cell * cell)))
    starts = range(0, len(cells), batch)
    for start in tqdm(starts, desc=f"MagNet {what} tiles", disable=not show_progress_bar, leave=False):
        chunk = cells[start : start + batch]
        tiles = np.stack([bs.read(int(c) * cell, int(r) * cell, cell) for c, r in chunk])
        x = normalize_tiles(torch.from_numpy(tiles).to(device))
        feats[start : start + len(chunk)] = module.encode_context(x).float().cpu().numpy()
    return feats


# ------------------------------------------------------------------------------------------------ batches
def _dihedral(crop: np.ndarray, k: int) -> np.ndarray:
    """One of the 8 flips/rotations of a ``(3, s, s)`` crop (paper: flips and 90° rotations)."""
    if k & 4:
        crop = crop[:, :, ::-1]
    return np.rot90(crop, k & 3, axes=(1, 2))


def _level_batch(
    cache: LevelCache, centres: np.ndarray, radius: int, allowed: tuple[int, int, int, int] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Tokens of the bins (local indices), local tiles' features, labels, labelled mask and tile-graph edges.

    ``allowed`` = ``(c0, r0, c1, r1)``: only tiles with ``c0 <= col < c1`` and ``r0 <= row < r1`` are tokens (a
    window's core and one ring of tiles, like the margin of a predicted tile).
    """
    tokens = neighbour_tokens(cell_of(centres, cache.cell), cache.cells, radius=radius)
    if allowed is not None:
        c0, r0, c1, r1 = allowed
        col, row = cache.cells[:, 0], cache.cells[:, 1]
        ok = (col >= c0) & (col < c1) & (row >= r0) & (row < r1)
        tokens = np.where((tokens >= 0) & ok[np.maximum(tokens, 0)], tokens, -1)
    used = np.unique(tokens[tokens >= 0])
    local = np.full(len(cache.cells), -1, dtype=np.int64)
    local[used] = np.arange(len(used))
    tokens = np.where(tokens >= 0, local[np.maximum(tokens, 0)], -1)
    edges = symmetric_knn_edges(cache.cells[used].astype(np.float64), K_NEIGHBOURS)
    return tokens, cache.feats[used], cache.labels[used], cache.labelled[used], edges


def make_batch(
    bs: BinSection,
    rows: np.ndarray,
    cols: np.ndarray,
    loss_mask: np.ndarray,
    model: Any,
    *,
    rng: np.random.Generator | None,
    crops: np.ndarray | None = None,
    allowed_regions: tuple[int, int, int, int] | None = None,
) -> dict[str, torch.Tensor]:
    """The tensors of one batch of grid positions (see :meth:`MagNetModule.forward`)."""
    centres = bs.centres(rows, cols)
    size = model.crop_px
    if crops is None:
        origins = crop_origins(centres, size)
        x0, y0 = origins.min(axis=0)
        side = int(max(origins.max(axis=0) - (x0, y0))) + size
        region = bs.read(int(x0), int(y0), side)
        crops = np.stack([region[:, oy - y0 : oy - y0 + size, ox - x0 : ox - x0 + size] for ox, oy in origins])
    if rng is not None:
        crops = np.stack([_dihedral(c, k) for c, k in zip(crops, rng.integers(0, 8, len(crops)), strict=True)])
    index = bs.lookup(rows, cols)
    labelled = (index >= 0) & loss_mask
    targets = np.zeros((len(rows), bs.targets.shape[1]), dtype=np.float32)
    targets[labelled] = bs.targets[index[labelled]]
    radius = 1 if model.n_tokens > 1 else 0
    batch: dict[str, Any] = {
        "crops": normalize_tiles(torch.from_numpy(np.ascontiguousarray(crops))),
        "bin_edges": torch.from_numpy(knn_edges(np.stack([cols, rows], 1).astype(np.float64), K_NEIGHBOURS)),
        "y_bin": torch.from_numpy(targets),
        "bin_mask": torch.from_numpy(labelled),
    }
    for level in ("region", "spot"):
        allowed = allowed_regions if level == "region" else None
        tokens, feats, labels, has, edges = _level_batch(bs.levels[level], centres, radius, allowed)
        parent = tokens[:, tokens.shape[1] // 2].copy()
        if model.faithful:  # SPEC §3.8/§3.10 item 10: the parent tile found by the nearest label vector
            parent = _nearest_label_parent(targets, labels, has, parent)
        batch.update(
            {
                f"bin_{level}": torch.from_numpy(tokens),
                f"{level}_feats": torch.from_numpy(feats),
                f"y_{level}": torch.from_numpy(labels),
                f"{level}_mask": torch.from_numpy(has),
                f"{level}_edges": torch.from_numpy(edges),
                f"parent_{level}": torch.from_numpy(parent),
            }
        )
    return batch


def _nearest_label_parent(targets: np.ndarray, labels: np.ndarray, has: np.ndarray, parent: np.ndarray) -> np.ndarray:
    candidates = np.flatnonzero(has)
    if not len(candidates):
        return parent
    d = ((targets[:, None, :] - labels[None, candidates, :]) ** 2).sum(axis=2)
    return candidates[d.argmin(axis=1)]


class WindowDataset(torch.utils.data.Dataset):
    """Batches of one epoch: contiguous windows (default) or random sets of measured bins (``faithful``).

    Item ``i`` of epoch ``e`` depends only on ``(seed, e, i)``, so a fit is reproducible.
    """

    def __init__(
        self,
        sections: list[BinSection],
        model: Any,
        *,
        n_batches: int | None,
        window_cells: int,
        halo_px: float,
        batch_bins: int,
        shuffle_bins: bool,
        augment: bool,
        seed: int,
    ) -> None:
        self.sections = sections
        self.model = model
        self.window_cells = window_cells
        self.halo_px = halo_px
        self.batch_bins = batch_bins
        self.shuffle_bins = shuffle_bins
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        # windows of window_cells × window_cells region tiles, on a grid of such blocks, that hold measured bins
        self.windows = [
            (k, tuple(c)) for k, bs in enumerate(sections) for c in np.unique(bs.windows // window_cells, axis=0)
        ]
        if shuffle_bins:
            n_bins = sum(len(bs.rows) for bs in sections)
            if n_bins < batch_bins:
                msg = (
                    f"The training sections hold {n_bins} bins, fewer than one batch of {batch_bins}; pass a smaller "
                    "`batch_bins` or more sections."
                )
                raise InputError(msg)
            natural = n_bins // batch_bins
        else:
            natural = len(self.windows)
        self.n = int(n_batches) if n_batches is not None else natural
        self.random = n_batches is not None or augment

    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int) -> None:
        """Draw the next epoch's batches."""
        self.epoch = epoch

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng((self.seed, self.epoch, i)) if self.random else None
        model = self.model
        if self.shuffle_bins:
            sizes = np.array([len(bs.rows) for bs in self.sections])
            k = int(rng.choice(len(sizes), p=sizes / sizes.sum())) if rng is not None else i % len(sizes)
            bs = self.sections[k]
            pick = (
                rng.choice(len(bs.rows), self.batch_bins, replace=False)
                if rng is not None
                else np.arange(i * self.batch_bins, (i + 1) * self.batch_bins) % len(bs.rows)
            )
            crops = np.stack(
                [
                    bs.read(int(ox), int(oy), model.crop_px)
                    for ox, oy in crop_origins(bs.centres(bs.rows[pick], bs.cols[pick]), model.crop_px)
                ]
            )
            return make_batch(
                bs,
                bs.rows[pick],
                bs.cols[pick],
                np.ones(len(pick), bool),
                model,
                rng=rng if self.augment else None,
                crops=crops,
            )
        k, (bx, by) = self.windows[
            int(rng.integers(len(self.windows)))
            if rng is not None and self.n != len(self.windows)
            else i % len(self.windows)
        ]
        bs = self.sections[k]
        r, w = model.region_px, self.window_cells
        cx, cy = bx * w, by * w
        core = (cx * r, cy * r, (cx + w) * r, (cy + w) * r)
        rows, cols, in_core = window_bins(core, bs.origin, bs.pitch, self.halo_px)
        allowed = (cx - 1, cy - 1, cx + w + 1, cy + w + 1)
        return make_batch(bs, rows, cols, in_core, model, rng=rng if self.augment else None, allowed_regions=allowed)


def epoch_callback() -> Callable[..., Any]:
    """A Lightning callback that tells the training :class:`WindowDataset` which epoch starts."""
    import lightning.pytorch as lp

    class _SetEpoch(lp.Callback):
        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            dataset = getattr(trainer.train_dataloader, "dataset", None)
            if isinstance(dataset, WindowDataset):
                dataset.set_epoch(trainer.current_epoch)

    return _SetEpoch()
