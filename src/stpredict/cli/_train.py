"""``stpredict train``: fit PixNet or MagNet on SpatialData stores and save the model folder."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from stpredict._errors import InputError

from ._common import EXIT_OK, Progress, add_command, read_store
from ._config import check_options, model_options, read_config

if TYPE_CHECKING:
    import argparse

    from spatialdata import SpatialData

__all__ = ["add_parser", "run"]

DESCRIPTION = """\
Train a dense model on the measured units (spots or bins, raw counts in the table's X) of one or more
SpatialData zarr stores, and save it to a model folder (config.json + weights.safetensors) that
`stpredict predict` and `st.models.load` read. The stores are only read.

Model and training options come from --config (YAML or TOML, sections `model:` and `fit:`, the keyword
arguments of st.models.PixNet / st.models.MagNet and of their .fit); the options of this command override
them. Sizes are in µm and µm per pixel, as in the Python API. Genes: the --genes N with the highest mean
count over the training stores, or the list in --genes-file. A `fit: target_layer:` naming a
normalisation (log1p_cpm, log10_minmax, prop_log) that the tables lack is fitted on the training stores
(st.pp.normalize) and applied to the validation stores.

Exit status: 0 done; 2 bad input or options (the message says what to change); 1 unexpected failure;
130 interrupted (the model folder is written only at the end, never half-written)."""

EXAMPLES = """\
  stpredict train slide1.zarr slide2.zarr --model pixnet --out models/pixnet --validation slide3.zarr
  stpredict train slide1.zarr --model magnet --out models/magnet --genes 100 --config magnet.yaml
  stpredict train slide1.zarr --model pixnet --out models/small --genes-file genes.txt --max-epochs 5

  a config file (YAML; TOML takes [model] and [fit] tables with the same keys):
    model:
      um_per_px: 1.0
      tile_size: 224
      value_kind: density
    fit:
      loss: poisson
      max_epochs: 30
      batch_size: 8"""


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Register ``train`` on the sub-command parser ``sub``."""
    p = add_command(
        sub,
        "train",
        summary="train PixNet or MagNet on SpatialData stores and save the model folder",
        description=DESCRIPTION,
        examples=EXAMPLES,
        parents=parents,
    )
    p.add_argument("stores", nargs="+", metavar="SDATA.zarr", help="training stores (SpatialData zarr)")
    p.add_argument("--model", required=True, choices=("pixnet", "magnet"), help="model family")
    p.add_argument("--out", required=True, metavar="MODEL_DIR", help="model folder to write (must not exist)")
    p.add_argument(
        "--validation",
        action="append",
        metavar="V.zarr",
        help="held-out store for early stopping and the best epoch (repeat for several)",
    )
    p.add_argument("--config", metavar="CFG", help="YAML or TOML file with `model:` and `fit:` options")
    genes = p.add_mutually_exclusive_group()
    genes.add_argument("--genes", type=int, metavar="N", help="predict the N genes with the highest mean count")
    genes.add_argument("--genes-file", metavar="FILE", help="predict the genes listed in FILE, one per line")
    p.add_argument(
        "--gene-method",
        choices=("mean", "highly_variable"),
        default="mean",
        help="how --genes N ranks genes (st.pp.select_genes)",
    )
    p.add_argument("--image", metavar="KEY", help="H&E image key in the stores (default: he, or fit.image_key)")
    p.add_argument("--table", metavar="KEY", help="table of measured units (default: table, or fit.table_key)")
    p.add_argument("--max-epochs", type=int, metavar="N", help="overrides fit.max_epochs")
    p.add_argument("--seed", type=int, help="seeds the model and the training (overrides both)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1, mps (overrides fit.device)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier model folder at --out")
    p.set_defaults(func=run, default_genes=250)


def _read_genes(path: str) -> list[str]:
    file = Path(path)
    if not file.is_file():
        msg = f"--genes-file: no file at {path!r}; check the path (one gene name per line)."
        raise InputError(msg)
    genes = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
    genes = [g for g in genes if g and not g.startswith("#")]
    if not genes:
        msg = f"--genes-file: {path!r} lists no genes; write one gene name per line."
        raise InputError(msg)
    return genes


def _check_out(out: Path, *, overwrite: bool) -> None:
    """Refuse ``--out`` before any work, as ``model.save`` would at the end."""
    from stpredict.models._io import _check_replaceable

    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        msg = (
            f"--out: {str(out)!r} already exists; pass --overwrite to replace an earlier model there, or choose "
            "another --out."
        )
        raise InputError(msg)
    _check_replaceable(out)


def _normalise_targets(
    train: list[SpatialData], validation: list[SpatialData], *, table_key: str, layer: str | None
) -> None:
    """Fit the normalisation ``layer`` names on the training tables and apply it to the validation tables."""
    import stpredict as st

    methods = ("log1p_cpm", "log10_minmax", "prop_log")
    tables = [s.tables[table_key] for s in train if table_key in s.tables]
    if layer is None or layer not in methods or len(tables) < len(train):
        return
    if all(layer in t.layers for t in tables):
        return
    st.pp.normalize(tables, method=layer)
    params = tables[0].uns["stpredict"]["normalize"][layer]
    for sdata in validation:
        if table_key in sdata.tables and layer not in sdata.tables[table_key].layers:
            st.pp.normalize(sdata.tables[table_key], params=params)


def run(args: argparse.Namespace) -> int:
    """Run ``stpredict train``."""
    import stpredict as st

    progress = Progress("train", quiet=args.quiet)
    config = read_config(args.config) if args.config else {"model": {}, "fit": {}}
    model_cls, fit_func = model_options(args.model)
    check_options("model", config["model"], model_cls, model_name=args.model)
    check_options("fit", config["fit"], fit_func, model_name=args.model)
    genes_from_file = _read_genes(args.genes_file) if args.genes_file else None
    if args.genes is not None and args.genes < 1:
        msg = f"--genes must be at least 1, got {args.genes}."
        raise InputError(msg)
    out = Path(args.out)
    _check_out(out, overwrite=args.overwrite)

    model_kwargs = dict(config["model"])  # the classes' own defaults are the measured recipes
    fit_kwargs = dict(config["fit"])
    overrides = {"image_key": args.image, "table_key": args.table, "max_epochs": args.max_epochs,
                 "seed": args.seed, "device": args.device}  # fmt: skip
    fit_kwargs |= {k: v for k, v in overrides.items() if v is not None}
    if args.seed is not None:
        model_kwargs["seed"] = args.seed
    image_key, table_key = fit_kwargs.get("image_key", "he"), fit_kwargs.get("table_key", "table")

    with progress.stage(f"reading {len(args.stores)} training and {len(args.validation or [])} validation stores"):
        train = [read_store(path, what="SDATA") for path in args.stores]
        validation = [read_store(path, what="--validation") for path in args.validation or []]
    for path, sdata in zip([*args.stores, *(args.validation or [])], [*train, *validation], strict=True):
        if image_key not in sdata.images:
            msg = f"{path}: no image {image_key!r}; images: {sorted(sdata.images)}. Name the H&E image with --image."
            raise InputError(msg)
        if not isinstance(table_key, str) or table_key not in sdata.tables:
            msg = (
                f"{path}: no table {table_key!r}; tables: {sorted(sdata.tables)}. Name the measured table with --table."
            )
            raise InputError(msg)

    if genes_from_file is not None:
        genes = genes_from_file
    else:
        n_top = args.genes if args.genes is not None else args.default_genes
        with progress.stage(f"selecting {n_top} genes ({args.gene_method})"):
            tables = [s.tables[table_key] for s in train]
            n_top = min(n_top, min(t.n_vars for t in tables)) if args.genes is None else n_top
            genes = st.pp.select_genes(tables, n_top=n_top, method=args.gene_method)
    _normalise_targets(train, validation, table_key=table_key, layer=fit_kwargs.get("target_layer"))

    with progress.stage(f"building {args.model} for {len(genes)} genes"):
        model = model_cls(genes, **model_kwargs)
    if validation:
        fit_kwargs["validation_data"] = validation if len(validation) > 1 else validation[0]
    with progress.stage(f"training {args.model}"), progress.bars():
        model.fit(train if len(train) > 1 else train[0], **fit_kwargs, **progress.fit_kwargs())
    with progress.stage(f"saving the model to {out}"):
        model.save(out, overwrite=args.overwrite)
    history = model.fit_history or {}
    epochs = len(history.get("train_loss", []))
    best = history.get("best_epoch")
    print(f"model: {out.resolve()}  ({args.model}, {len(genes)} genes, {epochs} epochs, best epoch {best})")
    return EXIT_OK
