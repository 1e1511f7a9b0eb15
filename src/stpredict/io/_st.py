"""Read a legacy Spatial Transcriptomics (ST, 1k/2k array) section folder into SpatialData."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from stpredict._errors import InputError
from stpredict._keys import Keys
from stpredict._logging import get_logger
from stpredict._validation import check_gene_names

from ._build import GLOBAL_CS, assemble, check_positive, check_units_on_image, counts_matrix
from ._image import build_image, decode_image, image_size

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from spatialdata import SpatialData

__all__ = ["read_st"]

logger = get_logger(__name__)

IMAGE_NAMES = ("image.png", "image.jpg", "image.jpeg", "image.tif", "image.tiff")
SPOTS_NAME = "spots.tsv"
COUNTS_NAMES = ("counts.tsv.gz", "counts.tsv")
META_NAME = "meta.json"
#: her2st-like section names: one patient letter, then the section number ("A1", "C5").
PATIENT_RULE = re.compile(r"^([A-Za-z])(\d+)$")
_COORD_PAIRS = (("img_x", "img_y"), ("pixel_x", "pixel_y"))
_BLACK = 16  # max channel value of a masked-background pixel
_BLACK_FRACTION = 0.05  # a render is "black-masked" above this fraction of black pixels
_MASK_GRID_PX = 512  # the inset search runs on a grid of about this many pixels along the longer side
_SYMBOL_COLUMNS = ("gene_name", "gene_symbol", "gene_symbols", "symbol", "name")


def read_st(
    path: str | Path,
    *,
    section: str | None = None,
    patient: str | None = None,
    um_per_px: float | None = None,
    spot_diameter_um: float | None = None,
    image_key: str = Keys.image,
    table_key: str = Keys.table,
    shapes_key: str = Keys.spots,
    gene_symbols: str | Path | Mapping[str, str] | pd.Series | pd.DataFrame | None = None,
    image_file: str | Path | None = None,
    scale_factors: Sequence[int] | None = None,
    chunks: int = 1024,
    mask_inset: bool = True,
) -> SpatialData:
    """Read one section of a legacy Spatial Transcriptomics experiment (her2st, STUtility layout).

    The folder holds ``image.png|jpg|tif`` (H&E), ``spots.tsv`` (the spot-selection table: array ``x``, ``y``,
    pixel coordinates ``img_x``/``img_y`` or ``pixel_x``/``pixel_y``, optional ``selected`` and ``spot_id``),
    ``counts.tsv.gz`` (spots × genes raw counts, index ``"<x>x<y>"``) and optionally ``meta.json``
    (``um_per_px``, ``spot_diameter_um``, ``patient``, notes).

    Rules:

    * Pixel coordinates: ``img_x``/``img_y`` when present (they are in the pixel space of the shipped image,
      e.g. her2st A1/A2, whose renders are 3.5× smaller than the scan that ``pixel_x``/``pixel_y`` refer to),
      else ``pixel_x``/``pixel_y``. ``x`` = column, ``y`` = row.
    * With a ``selected`` column, only spots with ``selected == 1`` (under tissue) are kept.
    * Spots without a row in the counts are dropped, with a warning in the log that gives their number;
      count rows without a selected spot are ignored.
    * ``um_per_px`` and ``spot_diameter_um``: the arguments, else ``meta.json``; neither gives an error that
      names the argument to pass (e.g. the STUtility mouse olfactory bulb records no spot diameter).
    * Whole-slide JPEGs (~9300 × 9900 px) are decoded once into memory (no global change to PIL's
      decompression-bomb limit) and wrapped in dask with a pyramid computed once.
    * Renders with a black-masked background (her2st A1/A2) carry an annotated thumbnail of the section in the
      top-right corner, which a tissue detector would take for tissue. With ``mask_inset=True``, when more than
      5% of the image is black (max channel < 16), every connected non-black region that touches the image
      border and holds no spot (within a spot radius) is painted black, and the log says where. Scans with a
      bright background are never changed.

    Parameters
    ----------
    path
        The section folder.
    section
        Section name; defaults to the folder name.
    patient
        Patient (or slide/donor) identifier for splits. Defaults to ``meta.json``'s ``patient``, else, for
        her2st-like section names (one letter followed by digits, ``"C3"``), to the letter (``"C"``); else none.
    um_per_px
        Micrometres per pixel of the image; overrides ``meta.json``.
    spot_diameter_um
        Spot diameter in µm (100 for the ST 1k array); overrides ``meta.json``.
    image_key, table_key, shapes_key
        Names of the image, table and spot shapes elements.
    gene_symbols
        Map from the gene names in the counts (e.g. Ensembl ids) to symbols: a mapping, a Series, a DataFrame
        or a (gzipped) TSV/CSV file with a ``gene_id`` (else first) column and a ``gene_name``/``symbol`` (else
        second) column. The symbols become ``var_names`` (unmapped genes keep their id; duplicated symbols are
        made unique with ``-1``, ``-2`` suffixes); the original names go to ``var["gene_ids"]``.
    image_file
        Image file to use instead of ``image.*`` in the folder.
    scale_factors
        Pyramid factors; default: factors of 2 until the coarsest level is at most 1024 px.
    chunks
        Dask chunk edge in pixels.
    mask_inset
        Paint spot-free border regions of black-masked renders black (see the rules above).

    Returns
    -------
    SpatialData with

    - ``images[image_key]``: ``(c, y, x)`` uint8 RGB, multiscale;
    - ``shapes[shapes_key]``: circles, radius ``spot_diameter_um / 2 / um_per_px`` image px, index 0..n-1;
    - ``tables[table_key]``: raw counts (csr float32); ``obs``: ``spot_id``, ``array_row`` (= ST ``y``),
      ``array_col`` (= ST ``x``), ``section``, ``patient``, ``region``, ``instance_id``;
      ``obsm["spatial"]``: spot centres in image px; ``uns["stpredict"]``: source and parameters.

    All elements are in coordinate system ``"global"`` (image pixels) and ``"um"`` (calibrated).

    Raises
    ------
    InputError
        For missing files, an unreadable or truncated image, spots outside the image, counts that are not
        finite non-negative integers, missing or duplicated gene names, no spots left, or an unknown scale.
    """
    folder = Path(path)
    if not folder.is_dir():
        msg = f"{str(folder)!r} is not a folder. Pass the folder of one ST section (image, spots.tsv, counts)."
        raise InputError(msg)
    meta = _read_meta(folder)
    section = str(section) if section is not None else folder.name
    patient = _patient(section, patient, meta)
    wanted = {"spot table": (SPOTS_NAME,), "counts table": COUNTS_NAMES}
    if image_file is None:
        wanted = {"image": IMAGE_NAMES, **wanted}
    found = _find(folder, wanted)
    image_path = Path(image_file) if image_file is not None else found["image"]
    spots_path, counts_path = found["spot table"], found["counts table"]
    um_per_px = _resolve_scale(um_per_px, meta, folder)
    spot_diameter_um = _resolve_diameter(spot_diameter_um, meta, folder)

    spots, coord_columns = _read_spots(spots_path)
    fix = (
        f"Check that {spots_path.name}'s {coord_columns[0]}/{coord_columns[1]} refer to {image_path.name} (not to "
        "a scan of another resolution), or pass the matching `image_file=`."
    )
    size = image_size(image_path)  # from the header: every cheap check runs before the slow decode
    check_units_on_image(spots[list(coord_columns)].to_numpy(dtype=np.float64), size, what="spots", fix=fix)
    genes, counts = _read_counts(counts_path)
    spots, counts = _match(spots, counts, spots_path, counts_path)
    var = _gene_table(genes, gene_symbols)
    xy = spots[list(coord_columns)].to_numpy(dtype=np.float64)

    array = decode_image(image_path)
    if array.shape[:2] != size:
        msg = f"{str(image_path)!r} decodes to {array.shape[:2]} px but its header says {size}; the file is corrupt."
        raise InputError(msg)
    masked = mask_unspotted_border_regions(array, xy, spot_diameter_um / 2 / um_per_px) if mask_inset else []
    image = build_image(
        array, transformations=_identity(), scale_factors=scale_factors, chunks=chunks, name=f"{section}-he"
    )

    obs = pd.DataFrame(
        {
            "spot_id": spots["spot_id"].astype(str).to_numpy(),
            "array_row": spots["y"].to_numpy(dtype=np.int64),
            "array_col": spots["x"].to_numpy(dtype=np.int64),
            "section": pd.Categorical([section] * len(spots)),
            "patient": pd.Categorical([patient] * len(spots)),
        },
        index=pd.Index([f"{section}_{s}" for s in spots["spot_id"]], name=None),
    )
    uns = {
        "reader": "stpredict.io.read_st",
        "source": str(folder),
        "section": section,
        "patient": patient,
        "um_per_px": um_per_px,
        "spot_diameter_um": spot_diameter_um,
        "coordinates": list(coord_columns),
        "meta": meta,
    }
    image_meta = {
        "source": str(image_path),
        "note": meta.get("image_note") or meta.get("note"),
        "masked_regions_xyxy": masked or None,
    }
    return assemble(
        image,
        xy=xy,
        counts=counts_matrix(counts, name=f"counts in {counts_path.name}"),
        var=var,
        obs=obs,
        um_per_px=um_per_px,
        diameter_um=spot_diameter_um,
        image_key=image_key,
        shapes_key=shapes_key,
        table_key=table_key,
        uns=uns,
        image_meta=image_meta,
    )


def mask_unspotted_border_regions(array: np.ndarray, xy: np.ndarray, radius_px: float) -> list[list[int]]:
    """Paint black, in place, the spot-free non-black regions touching the border of a black-masked render.

    Returns the painted regions' bounding boxes ``[x0, y0, x1, y1]`` (image pixels, end-exclusive).
    """
    from scipy import ndimage

    if np.mean(array[::16, ::16].max(axis=2) < _BLACK) < _BLACK_FRACTION:
        return []
    stride = max(1, round(max(array.shape[:2]) / _MASK_GRID_PX))
    black = array[::stride, ::stride].max(axis=2) < _BLACK
    labels, n = ndimage.label(~black, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return []
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    reach = int(np.ceil(radius_px / stride))
    spotted: set[int] = set()
    for x, y in (np.asarray(xy) / stride).astype(int):
        window = labels[max(0, y - reach) : y + reach + 1, max(0, x - reach) : x + reach + 1]
        spotted.update(np.unique(window).tolist())
    boxes: list[list[int]] = []
    for label in sorted(set(border.tolist()) - spotted - {0}):
        region = labels == label
        region = ndimage.binary_dilation(region) & (region | black)  # also the blocky edge of the coarse grid
        rows, cols = np.nonzero(region)
        y0, y1 = int(rows.min()) * stride, min(array.shape[0], (int(rows.max()) + 1) * stride)
        x0, x1 = int(cols.min()) * stride, min(array.shape[1], (int(cols.max()) + 1) * stride)
        full = np.repeat(
            np.repeat(region[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1], stride, 0), stride, 1
        )
        array[y0:y1, x0:x1][full[: y1 - y0, : x1 - x0]] = 0
        boxes.append([x0, y0, x1, y1])
        logger.info(
            "Painted black a spot-free region at the image border (x %d–%d, y %d–%d): an inset, not tissue.",
            x0,
            x1,
            y0,
            y1,
        )
    return boxes


def _identity() -> dict[str, Any]:
    from spatialdata.transformations import Identity

    return {GLOBAL_CS: Identity()}


def _read_meta(folder: Path) -> dict[str, Any]:
    meta_path = folder / META_NAME
    if not meta_path.is_file():
        return {}
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as error:
        msg = f"{str(meta_path)!r} is not valid JSON ({error}). Fix or delete it, and pass the scale as arguments."
        raise InputError(msg) from error
    if not isinstance(meta, dict):
        msg = f"{str(meta_path)!r} must hold a JSON object, got {type(meta).__name__}."
        raise InputError(msg)
    return meta


def _find(folder: Path, wanted: Mapping[str, Sequence[str]]) -> dict[str, Path]:
    """The first existing file of each ``{what: candidate names}``; one error lists every one that is missing."""
    found: dict[str, Path] = {}
    missing: list[str] = []
    for what, names in wanted.items():
        path = next((folder / name for name in names if (folder / name).is_file()), None)
        if path is None:
            missing.append(f"{what} ({' or '.join(names)})")
        else:
            found[what] = path
    if missing:
        present = sorted(p.name for p in folder.iterdir())
        fix = " (or pass `image_file=` for the image)" if "image" in wanted and "image" not in found else ""
        msg = (
            f"The ST section folder {str(folder)!r} lacks: {'; '.join(missing)}. Found {present}. Add or rename the "
            f"files{fix}."
        )
        raise InputError(msg)
    return found


def _patient(section: str, patient: str | None, meta: Mapping[str, Any]) -> str | None:
    if patient is not None:
        return str(patient)
    if meta.get("patient") is not None:
        return str(meta["patient"])
    match = PATIENT_RULE.match(section)
    return match.group(1) if match else None


def _resolve_scale(um_per_px: float | None, meta: Mapping[str, Any], folder: Path) -> float:
    if um_per_px is not None:
        return check_positive(um_per_px, "um_per_px", "Pass the image's pixel size in micrometres.")
    if meta.get("um_per_px") is not None:
        return check_positive(meta["um_per_px"], f"um_per_px in {META_NAME}", "Fix it, or pass `um_per_px=`.")
    msg = (
        f"The pixel size of the image in {str(folder)!r} is unknown ({META_NAME} has no `um_per_px`). Pass "
        "`um_per_px=` (micrometres per image pixel), e.g. from the scanner metadata."
    )
    raise InputError(msg)


def _resolve_diameter(spot_diameter_um: float | None, meta: Mapping[str, Any], folder: Path) -> float:
    if spot_diameter_um is not None:
        return check_positive(spot_diameter_um, "spot_diameter_um", "Pass the spot diameter in micrometres.")
    if meta.get("spot_diameter_um") is not None:
        return check_positive(
            meta["spot_diameter_um"], f"spot_diameter_um in {META_NAME}", "Fix it, or pass `spot_diameter_um=`."
        )
    hint = ""
    if meta.get("nn_spot_distance_um") is not None:
        hint = f" ({META_NAME} records a {meta['nn_spot_distance_um']} µm spot-to-spot distance, not the diameter.)"
    msg = (
        f"The spot diameter of the section in {str(folder)!r} is not recorded.{hint} Pass `spot_diameter_um=` "
        "(e.g. 100 for the ST 1k array), from the array's specification."
    )
    raise InputError(msg)


def _read_spots(spots_path: Path) -> tuple[pd.DataFrame, tuple[str, str]]:
    try:
        spots = pd.read_csv(spots_path, sep="\t")
    except (OSError, ValueError, pd.errors.ParserError) as error:
        msg = f"Cannot read the spot table {str(spots_path)!r} ({error}). It must be tab-separated with a header."
        raise InputError(msg) from error
    coords = next((pair for pair in _COORD_PAIRS if set(pair) <= set(spots.columns)), None)
    missing = {"x", "y"} - set(spots.columns)
    if coords is None or missing:
        msg = (
            f"The spot table {str(spots_path)!r} needs columns x, y (array coordinates) and img_x/img_y or "
            f"pixel_x/pixel_y (pixel coordinates); it has {list(spots.columns)}."
        )
        raise InputError(msg)
    if "spot_id" not in spots.columns:
        spots["spot_id"] = spots["x"].astype(str) + "x" + spots["y"].astype(str)
    if "selected" in spots.columns:
        keep = pd.to_numeric(spots["selected"], errors="coerce") == 1
        if (~keep).any():
            logger.info(
                "%s: %d of %d spots are not selected (under tissue) and are skipped.",
                spots_path.name,
                int((~keep).sum()),
                len(spots),
            )
        spots = spots.loc[keep]
    if len(spots) == 0:
        msg = f"The spot table {str(spots_path)!r} has no (selected) spots. Check the file and its `selected` column."
        raise InputError(msg)
    for column in ("x", "y"):
        values = pd.to_numeric(spots[column], errors="coerce")
        if values.isna().any() or not np.all(values == np.round(values)):
            msg = f"Column {column!r} of {str(spots_path)!r} must hold integer array coordinates."
            raise InputError(msg)
    if spots["spot_id"].duplicated().any():
        dups = spots.loc[spots["spot_id"].duplicated(), "spot_id"].head(5).tolist()
        msg = f"The spot table {str(spots_path)!r} lists spots more than once (e.g. {dups}). Remove the duplicates."
        raise InputError(msg)
    return spots.reset_index(drop=True), coords


def _header(counts_path: Path) -> list[str]:
    opener = gzip.open if counts_path.suffix == ".gz" else open
    try:
        with opener(counts_path, "rt") as handle:
            line = handle.readline()
    except (OSError, EOFError, UnicodeDecodeError) as error:
        msg = f"Cannot read the counts table {str(counts_path)!r} ({error}). It must be a (gzipped) TSV file."
        raise InputError(msg) from error
    fields = line.rstrip("\r\n").split("\t")
    if len(fields) < 2:
        msg = f"The counts table {str(counts_path)!r} has no gene columns. Expected a spots × genes TSV with a header."
        raise InputError(msg)
    return fields[1:]


def _read_counts(counts_path: Path) -> tuple[pd.Index, pd.DataFrame]:
    genes = pd.Index(_header(counts_path))
    # Checked on the raw header: pandas would silently rename duplicated ("GENE.1") and empty ("Unnamed: 3") names.
    check_gene_names(genes, name=f"gene names in the header of {counts_path.name}")
    try:
        counts = pd.read_csv(counts_path, sep="\t", index_col=0, header=0)
    except (OSError, EOFError, ValueError, pd.errors.ParserError) as error:
        msg = f"Cannot parse the counts table {str(counts_path)!r} ({error}). It must be a spots × genes TSV."
        raise InputError(msg) from error
    counts.columns = genes
    counts.index = counts.index.astype(str)
    if counts.index.duplicated().any():
        dups = counts.index[counts.index.duplicated()][:5].tolist()
        msg = f"The counts table {str(counts_path)!r} has duplicated spot rows (e.g. {dups}). Remove the duplicates."
        raise InputError(msg)
    return genes, counts


def _match(
    spots: pd.DataFrame, counts: pd.DataFrame, spots_path: Path, counts_path: Path
) -> tuple[pd.DataFrame, pd.DataFrame]:
    ids = spots["spot_id"].astype(str)
    has_counts = ids.isin(counts.index).to_numpy()
    if not has_counts.any():
        msg = (
            f"None of the {len(spots)} spots in {spots_path.name} has a row in {counts_path.name} (spot ids like "
            f"{ids.iloc[0]!r} vs. rows like {counts.index[0] if len(counts) else None!r}). Check that the two files "
            "belong to the same section."
        )
        raise InputError(msg)
    if not has_counts.all():
        logger.warning(
            "%d of %d selected spots in %s have no row in %s and are dropped (e.g. %s).",
            int((~has_counts).sum()),
            len(spots),
            spots_path.name,
            counts_path.name,
            ids[~has_counts].head(3).tolist(),
        )
        spots = spots.loc[has_counts].reset_index(drop=True)
    unused = int((~counts.index.isin(ids)).sum())
    if unused:
        logger.info("%d rows of %s belong to no selected spot and are ignored.", unused, counts_path.name)
    return spots, counts.loc[spots["spot_id"].astype(str)]


def _gene_table(genes: pd.Index, gene_symbols: Any) -> pd.DataFrame:
    if gene_symbols is None:
        return pd.DataFrame(index=pd.Index(genes.astype(str), name=None))
    mapping = _symbol_map(gene_symbols)
    symbols = pd.Series(genes.astype(str), index=genes).map(mapping)
    mapped = symbols.notna() & (symbols.astype(str).str.strip() != "")
    names = pd.Index(np.where(mapped, symbols.astype(str), genes.astype(str)))
    logger.info("Gene symbols for %d of %d genes; the others keep their id.", int(mapped.sum()), len(genes))
    if names.has_duplicates:
        from anndata.utils import make_index_unique

        logger.info("%d duplicated gene symbols made unique with -1, -2 … suffixes.", int(names.duplicated().sum()))
        names = make_index_unique(names)
    return pd.DataFrame({"gene_ids": genes.astype(str).to_numpy()}, index=pd.Index(names, name=None))


def _symbol_map(gene_symbols: Any) -> dict[str, str]:
    table: Any = gene_symbols
    if isinstance(gene_symbols, str | Path):
        source = Path(gene_symbols)
        if not source.is_file():
            msg = f"Gene symbol table {str(source)!r} does not exist. Pass a file, a mapping, or None."
            raise InputError(msg)
        sep = "," if ".csv" in source.suffixes else "\t"
        table = pd.read_csv(source, sep=sep)
    if isinstance(table, pd.DataFrame):
        if table.shape[1] < 2:
            msg = "The gene symbol table needs an id column and a symbol column."
            raise InputError(msg)
        id_col = "gene_id" if "gene_id" in table.columns else table.columns[0]
        symbol_col = next((c for c in _SYMBOL_COLUMNS if c in table.columns), table.columns[1])
        table = pd.Series(table[symbol_col].to_numpy(), index=table[id_col].astype(str).to_numpy())
    if isinstance(table, pd.Series):
        return {str(k): v for k, v in table.dropna().items()}
    return {str(k): v for k, v in dict(table).items() if v is not None}
