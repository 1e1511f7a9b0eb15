"""``stpredict predict | aggregate | evaluate``: the tools of :mod:`stpredict.tl` on a SpatialData zarr store."""

from __future__ import annotations

import json
import math
import numbers
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stpredict._elements import quiet_zarr_writes
from stpredict._errors import InputError

from ._common import EXIT_OK, Progress, add_command, read_store

if TYPE_CHECKING:
    import argparse

    from spatialdata import SpatialData

__all__ = ["add_parsers", "write_json"]

_EXIT = """

Exit status: 0 done; 2 bad input or options (the message says what to change); 1 unexpected failure;
130 interrupted."""

PREDICT = (
    """\
Predict dense per-gene maps over the H&E image of a SpatialData zarr store with a trained model folder
(st.tl.predict_dense), and write the map into the store as a multiscale image (channels = genes).

Tiles cover the tissue only and are blended without seams; the map is written chunk by chunk into
<store>/.stpredict_tmp/<key>/ and moved to images/<key> with one rename when complete, so nothing
half-written ever sits under the final key. An interrupted run (a killed job, Ctrl-C) resumes where it
stopped when rerun with the same command (same model, --batch-size and --device), and gives the same map
bit for bit. An existing element <key> is refused unless --overwrite."""
    + _EXIT
)

PREDICT_EXAMPLES = """\
  stpredict predict slide.zarr --model models/pixnet
  stpredict predict slide.zarr --model models/pixnet --key-added he_pixnet_v2 --device cuda --batch-size 64
  stpredict predict slide.zarr --model models/pixnet --overwrite      # replace an earlier he_pixnet"""

AGGREGATE = (
    """\
Aggregate a dense map of a SpatialData zarr store into a table (st.tl.aggregate) and write it into the
store: square bins of --bin-size µm (written with their shapes <key>_bins), the units of a shapes element
(--shapes, e.g. Visium spots) or of a labels element (--labels, e.g. cells). Every map pixel counts by
the exact area it shares with a unit; density maps are summed (expected counts), intensive maps averaged.
The table carries obsm["spatial"], the region it annotates and its parameters, so squidpy and scanpy use
it directly. Existing elements are refused unless --overwrite."""
    + _EXIT
)

AGGREGATE_EXAMPLES = """\
  stpredict aggregate slide.zarr --map he_pixnet --bin-size 16            # table he_pixnet_16um
  stpredict aggregate slide.zarr --map he_pixnet --bin-size 8 --bin-size 55   # one table per size
  stpredict aggregate slide.zarr --map he_pixnet --shapes spots --key-added he_pixnet_spots"""

EVALUATE = (
    """\
Score a predicted table against a measured (or ground-truth) table of the same SpatialData zarr store
(st.tl.evaluate): gene-wise Pearson and Spearman correlation, MSE, MAE, SSIM on grids, and their
summaries (PCC@F/S/M: first quartile, median and mean over genes). Prints the summary; --json writes the
summary, the per-gene metrics and the parameters. The store is only read.

Both tables must be in the space the metrics are reported in: --normalize normalises both here (fitted
on the truth; for counts, e.g. a density map summed into units), --truth-normalize only the truth's
counts (for an intensive map, e.g. PixNet's default log1p CPM values), and --pred-layer/--truth-layer
read normalised layers."""
    + _EXIT
)

EVALUATE_EXAMPLES = """\
  stpredict evaluate slide.zarr --pred he_pixnet_spots --truth table --normalize log1p_cpm        # density map
  stpredict evaluate slide.zarr --pred he_pixnet_spots --truth table --truth-normalize log1p_cpm  # intensive map
  stpredict evaluate slide.zarr --pred he_pixnet_spots --truth table --truth-layer log1p_cpm --json metrics.json"""


_METHODS = ("log1p_cpm", "log10_minmax", "prop_log")


def add_parsers(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Register ``predict``, ``aggregate`` and ``evaluate`` on the sub-command parser ``sub``."""
    p = add_command(
        sub,
        "predict",
        summary="predict dense gene maps into a store with a trained model (resumable)",
        description=PREDICT,
        examples=PREDICT_EXAMPLES,
        parents=parents,
    )
    p.add_argument("store", metavar="SDATA.zarr", help="SpatialData zarr store, written into")
    p.add_argument("--model", required=True, metavar="MODEL_DIR", help="model folder from `stpredict train`")
    p.add_argument("--image", default="he", metavar="KEY", help="H&E image key")
    p.add_argument("--key-added", metavar="KEY", help="key of the map (default: <image>_<model>, e.g. he_pixnet)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing element --key-added")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--batch-size", type=int, default=16, metavar="N", help="tiles per model call")
    p.add_argument("--tissue-key", metavar="KEY", help="labels of the tissue mask (default: <image>_tissue if present)")
    p.add_argument("--all-tiles", action="store_true", help="predict the whole image, not only the tissue")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="storage type of the map")
    p.set_defaults(func=_predict)

    a = add_command(
        sub,
        "aggregate",
        summary="aggregate a dense map into a table of bins (µm), shapes or labels in the store",
        description=AGGREGATE,
        examples=AGGREGATE_EXAMPLES,
        parents=parents,
    )
    a.add_argument("store", metavar="SDATA.zarr", help="SpatialData zarr store, written into")
    a.add_argument("--map", required=True, metavar="KEY", help="dense map (image with gene channels)")
    units = a.add_mutually_exclusive_group(required=True)
    units.add_argument(
        "--bin-size", type=float, action="append", metavar="UM", help="square bin side in µm (repeat for several)"
    )
    units.add_argument("--shapes", metavar="KEY", help="shapes element whose units to aggregate into")
    units.add_argument("--labels", metavar="KEY", help="labels element whose labels to aggregate into")
    a.add_argument("--key-added", metavar="KEY", help="table key (default: <map>_<size>um, <map>_<shapes>)")
    a.add_argument("--reduce", choices=("sum", "mean"), help="default from the map's value kind")
    a.add_argument("--force", action="store_true", help="allow the reduction that does not fit the map's kind")
    a.add_argument("--overwrite", action="store_true", help="replace existing elements of the same keys")
    a.set_defaults(func=_aggregate)

    e = add_command(
        sub,
        "evaluate",
        summary="score a predicted table against a measured one; print and save the metrics",
        description=EVALUATE,
        examples=EVALUATE_EXAMPLES,
        parents=parents,
    )
    e.add_argument("store", metavar="SDATA.zarr", help="SpatialData zarr store, only read")
    e.add_argument("--pred", required=True, metavar="TABLE", help="predicted table key")
    e.add_argument("--truth", required=True, metavar="TABLE", help="measured or ground-truth table key")
    norm = e.add_mutually_exclusive_group()
    norm.add_argument(
        "--normalize", choices=_METHODS, help="normalise both tables (counts, e.g. a density map summed into units)"
    )
    norm.add_argument(
        "--truth-normalize",
        choices=_METHODS,
        help="normalise the truth's counts only (an intensive map, e.g. PixNet's default log1p CPM values)",
    )
    e.add_argument("--pred-layer", metavar="LAYER", help="layer of the predicted table instead of X")
    e.add_argument("--truth-layer", metavar="LAYER", help="layer of the truth table instead of X")
    e.add_argument(
        "--match", choices=("auto", "instance_id", "obs_names", "position"), default="auto", help="how units pair"
    )
    e.add_argument(
        "--nan-policy",
        choices=("minus_one", "omit", "propagate"),
        default="minus_one",
        help="undefined correlations: -1 (published convention), left out, or NaN",
    )
    e.add_argument("--json", metavar="FILE", help="write summary, per-gene metrics and parameters as JSON")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    e.set_defaults(func=_evaluate)


# ---------------------------------------------------------------------------------------------------- predict
def _predict(args: argparse.Namespace) -> int:
    import stpredict as st

    progress = Progress("predict", quiet=args.quiet)
    model_dir = Path(args.model)
    if not model_dir.exists():
        msg = f"--model: no model folder at {args.model!r}; train one with `stpredict train ... --out {args.model}`."
        raise InputError(msg)
    sdata = read_store(args.store)
    if args.image not in sdata.images:
        msg = (
            f"no image {args.image!r} in {args.store}; images: {sorted(sdata.images)}. Name the H&E image with --image."
        )
        raise InputError(msg)
    model = st.models.load(model_dir)
    key = args.key_added or f"{args.image}_{model.name}"
    with progress.stage(f"predicting {len(model.var_names)} genes into images/{key}"), progress.bars():
        st.tl.predict_dense(
            sdata,
            model,
            image_key=args.image,
            key_added=key,
            tissue_only=not args.all_tiles,
            tissue_key=args.tissue_key,
            batch_size=args.batch_size,
            device=args.device,
            dtype=args.dtype,
            overwrite=args.overwrite,
            show_progress_bar=progress.show_bars,
        )
    shape = sdata.images[key]["scale0"]["image"].shape if key in sdata.images else None
    print(f"map: images/{key} in {Path(args.store).resolve()}  ({len(model.var_names)} genes, shape {shape})")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------- aggregate
def _changed(sdata: SpatialData, before: dict[tuple[str, str], Any]) -> list[tuple[str, str]]:
    """(type, key) of the shapes and tables added or replaced since ``before``: shapes first, then tables."""
    now = {(kind, key): el for kind in ("shapes", "tables") for key, el in getattr(sdata, kind).items()}
    return sorted((pair for pair, el in now.items() if before.get(pair) is not el), key=lambda p: (p[0] != "shapes", p))


def _check_keys(sdata: SpatialData, args: argparse.Namespace, sizes: list[float | None]) -> None:
    """Refuse every key the command writes before any work: in memory and in the store, for all bin sizes."""
    from stpredict._elements import check_new_elements
    from stpredict._keys import Keys

    new: dict[str, Any] = {}
    for size in sizes:
        if size is not None:
            key = args.key_added or Keys.binned(args.map, size)
            new |= {key: "tables", f"{key}_bins": "shapes"}
        else:
            new[args.key_added or f"{args.map}_{args.shapes or args.labels}"] = "tables"
    check_new_elements(sdata, new, overwrite=args.overwrite, on_disk=True, param="--key-added")


def _aggregate(args: argparse.Namespace) -> int:
    import stpredict as st

    progress = Progress("aggregate", quiet=args.quiet)
    sdata = read_store(args.store)
    if args.map not in sdata.images:
        msg = f"no image {args.map!r} in {args.store}; images: {sorted(sdata.images)}. Name the dense map with --map."
        raise InputError(msg)
    sizes = args.bin_size or [None]
    if args.key_added and len(sizes) > 1:
        msg = "--key-added names one table; with several --bin-size, leave it out (tables are named <map>_<size>um)."
        raise InputError(msg)
    for size in sizes:
        if size is not None and not (math.isfinite(size) and size > 0):
            msg = f"--bin-size must be a positive number of µm, got {size}."
            raise InputError(msg)
    _check_keys(sdata, args, sizes)
    written: list[tuple[str, str]] = []
    for size in sizes:
        before = {(kind, key): el for kind in ("shapes", "tables") for key, el in getattr(sdata, kind).items()}
        what = f"{size:g} µm bins" if size is not None else (args.shapes or args.labels)
        with progress.stage(f"aggregating {args.map} into {what}"), progress.bars():
            st.tl.aggregate(
                sdata,
                args.map,
                bin_size=size,
                shapes_key=args.shapes,
                labels_key=args.labels,
                reduce=args.reduce,
                key_added=args.key_added,
                force=args.force,
                overwrite=args.overwrite,
                show_progress_bar=progress.show_bars,
            )
        changed = _changed(sdata, before)
        on_disk = {(kind, key) for kind, key in changed if (Path(sdata.path) / kind / key).exists()}
        for kind, key in changed:  # the bins' shapes before the table that annotates them
            if (kind, key) in on_disk:  # --overwrite (checked above); spatialdata replaces only what is not stored
                sdata.delete_element_from_disk(key)
            with quiet_zarr_writes():
                sdata.write_element(key)
        written += changed
    for kind, key in written:
        if kind == "tables":
            table = sdata.tables[key]
            print(f"table: tables/{key} in {Path(args.store).resolve()}  ({table.n_obs} units × {table.n_vars} genes)")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------- evaluate
def _finite(value: Any) -> Any:
    """JSON has no NaN: ``None`` for it (and for infinities)."""
    value = float(value)
    return value if math.isfinite(value) else None


def _jsonable(value: Any) -> Any:
    """Parameters as JSON: containers recursively, numpy scalars as Python numbers, NaN as ``None``."""
    import numpy as np

    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return _finite(value)
    return str(value)


def write_json(path: str | os.PathLike[str], data: Any, *, overwrite: bool) -> Path:
    """Write ``data`` as JSON to ``path`` in one step (a temporary file renamed), refusing an existing file.

    Parameters
    ----------
    path
        The file.
    data
        JSON-serialisable data (NaN as ``None``).
    overwrite
        Replace an existing file.

    Returns
    -------
    The file written.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        msg = f"--json: {str(path)!r} already exists; pass --overwrite to replace it, or choose another file."
        raise InputError(msg)
    if path.is_dir():
        msg = f"--json: {str(path)!r} is a folder; name a file."
        raise InputError(msg)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def evaluation_record(result: Any) -> dict[str, Any]:
    """The JSON record of an :class:`~stpredict.tl.EvaluationResult`: summary, per-gene metrics, parameters."""
    per_gene = {str(gene): {str(col): _finite(v) for col, v in row.items()} for gene, row in result.per_gene.iterrows()}
    return {
        "summary": {str(k): _finite(v) for k, v in result.summary.items()},
        "per_gene": per_gene,
        "params": _jsonable(dict(result.params)),
    }


def _evaluate(args: argparse.Namespace) -> int:
    import stpredict as st
    from stpredict.tl._evaluate import METRIC_LABELS

    if args.json and Path(args.json).exists() and not args.overwrite:  # refused before the work, too
        write_json(args.json, {}, overwrite=False)
    sdata = read_store(args.store)
    truth: Any = args.truth
    truth_layer = args.truth_layer
    if args.truth_normalize:  # a normalised copy of the truth; the store is not changed
        if args.truth_layer:
            msg = "--truth-normalize normalises the truth's counts; leave out --truth-layer, or name the counts' layer."
            raise InputError(msg)
        if args.truth not in sdata.tables:
            msg = f"no table {args.truth!r} in {args.store}; tables: {sorted(sdata.tables)}. Name it with --truth."
            raise InputError(msg)
        truth = st.pp.normalize(sdata.tables[args.truth], method=args.truth_normalize, copy=True)
        truth_layer = args.truth_normalize
    result = st.tl.evaluate(
        args.pred,
        truth,
        sdata=sdata,
        match=args.match,
        pred_layer=args.pred_layer,
        truth_layer=truth_layer,
        normalize=args.normalize,
        nan_policy=args.nan_policy,
        inplace=False,
    )
    n_units, n_genes = result.params.get("n_units"), result.params.get("n_genes")
    lines = [f"{args.pred} vs {args.truth}: {n_units} units, {n_genes} genes", ""]
    lines += [f"  {name:<12}{value:>10.4f}  {METRIC_LABELS.get(name, '')}" for name, value in result.summary.items()]
    print("\n".join(lines))
    if args.json:
        path = write_json(args.json, evaluation_record(result), overwrite=args.overwrite)
        print(f"\nmetrics: {path.resolve()}")
    return EXIT_OK
