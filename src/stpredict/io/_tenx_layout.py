"""Check a 10x Genomics output folder (Visium, Visium HD, Xenium) before spatialdata-io reads it.

spatialdata-io's readers assume a complete bundle: on an empty or incomplete folder they fail deep inside
(``Cannot determine the library_id``, a bare ``AssertionError``, an h5py ``FileNotFoundError``, an unbound local
variable) or, worse, return a SpatialData with elements silently missing. The checks here follow exactly the
files and keys that spatialdata-io 0.7 reads for the options given (its defaults are read from its signature),
and raise one :class:`~stpredict._errors.InputError` that names the folder, the layout that was expected and
every missing or unusable piece, with the argument that points the reader elsewhere.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stpredict._errors import InputError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping

__all__ = ["check_visium_hd_layout", "check_visium_layout", "check_xenium_layout", "reader_options"]

# Space Ranger (Visium): names as in spatialdata_io._constants.VisiumKeys
SCALEFACTORS = "scalefactors_json.json"
POSITIONS_V1 = "tissue_positions_list.csv"  # Space Ranger 1.x
POSITIONS_V2 = "tissue_positions.csv"  # Space Ranger 2.0 and later
HIRES = "tissue_hires_image.png"
LOWRES = "tissue_lowres_image.png"
VISIUM_SCALE_KEYS = ("tissue_hires_scalef", "tissue_lowres_scalef", "spot_diameter_fullres")
# Visium HD (VisiumHDKeys)
FEATURE_SLICE = "feature_slice.h5"
BINNED = "binned_outputs"
SEGMENTED = "segmented_outputs"
HD_GLOBAL_SCALE_KEYS = ("tissue_hires_scalef", "tissue_lowres_scalef")
HD_BIN_SCALE_KEYS = ("bin_size_um", "spot_diameter_fullres", "microns_per_pixel")
HD_POSITION_COLUMNS = ("barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres")
_BIN_DIR = re.compile(r"^square_(\d{3})um$")
_MAX_LISTED = 15
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}  # decoded by PIL from the header; TIFF variants are left to the reader


def reader_options(reader: Callable[..., Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The options a spatialdata-io reader will run with: its signature's defaults updated by ``kwargs``."""
    import inspect

    defaults = {
        name: p.default
        for name, p in inspect.signature(reader).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    return {**defaults, **kwargs}


def _check_folder(folder: Path, what: str, expected: str) -> None:
    if folder.is_dir():
        return
    state = "is a file, not a folder" if folder.exists() else "does not exist"
    msg = f"The {what} folder {str(folder)!r} {state}. Pass the {expected}."
    raise InputError(msg)


def _present(folder: Path) -> list[str]:
    """Up to :data:`_MAX_LISTED` files and folders of ``folder``, two levels deep, relative to it."""
    names: list[str] = []
    for entry in sorted(folder.iterdir()):
        names.append(entry.name + ("/" if entry.is_dir() else ""))
        if entry.is_dir():
            names += [f"{entry.name}/{sub.name}" for sub in sorted(entry.iterdir())]
    return names[:_MAX_LISTED] + ([f"... ({len(names) - _MAX_LISTED} more)"] if len(names) > _MAX_LISTED else [])


def _raise(folder: Path, what: str, expected: str, problems: Iterable[str]) -> None:
    problems = list(problems)
    if not problems:
        return
    listing = "\n".join(f"  - {p}" for p in problems)
    found = _present(folder)
    hint = ""
    if (folder / "outs").is_dir():
        hint = f" It holds an `outs/` folder: pass {str(folder / 'outs')!r}."
    msg = (
        f"The {what} folder {str(folder)!r} is not a complete {expected}. Missing or unusable:\n{listing}\n"
        f"Found: {found or 'nothing (the folder is empty)'}.{hint} Point `path` at the complete output folder, or "
        "copy the missing files into it."
    )
    raise InputError(msg)


def _file(path: Path | None, rel: str, what: str) -> list[str]:
    """``[]`` when ``path`` is a file readable as its suffix says (HDF5, image), else the problem, naming ``rel``."""
    if path is None or not path.is_file():
        return [f"{rel}: {what}"]
    reason = None
    suffix = path.suffix.lower()
    if path.stat().st_size == 0:
        reason = "the file is empty"
    elif suffix == ".h5":
        import h5py

        if not h5py.is_hdf5(path):
            reason = "not an HDF5 file (damaged, or not completely copied)"
    elif suffix in _IMAGE_SUFFIXES:
        from ._image import image_size

        try:
            image_size(path)
        except InputError:
            reason = "not a readable image (damaged, or not completely copied)"
    return [] if reason is None else [f"{rel}: {what}, is unusable: {reason}"]


def _json_keys(path: Path, rel: str, keys: Iterable[str], what: str) -> tuple[dict[str, Any] | None, list[str]]:
    """The JSON object in ``path`` and the problems with it (unreadable, or lacking some of ``keys``)."""
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        return None, [f"{rel}: {what}, is not readable JSON ({error})"]
    if not isinstance(content, dict):
        return None, [f"{rel}: {what}, must hold a JSON object"]
    lacking = [k for k in keys if k not in content]
    if lacking:
        return content, [f"{rel}: {what}, lacks the key(s) {lacking}"]
    return content, []


# --------------------------------------------------------------------------- Visium (Space Ranger 1.x, 2.x)


def _visium_counts(folder: Path, counts_file: str) -> Path | None:
    if (folder / counts_file).is_file():
        return folder / counts_file
    return next((p for p in sorted(folder.iterdir()) if p.is_file() and p.name.endswith(f"_{counts_file}")), None)


def check_visium_layout(
    folder: Path, *, options: Mapping[str, Any], image_file: str | Path | None, image_resolution: str
) -> None:
    """Raise one InputError naming every file of a Space Ranger Visium ``outs`` folder that spatialdata-io lacks.

    Parameters
    ----------
    folder
        The folder passed to the reader.
    options
        The options :func:`spatialdata_io.visium` runs with (``counts_file``, ``tissue_positions_file``,
        ``scalefactors_file``), see :func:`reader_options`.
    image_file
        The full-resolution image given by the user, if any.
    image_resolution
        ``"auto"``, ``"full"``, ``"hires"`` or ``"lowres"``: which image must be present.
    """
    if (folder / "spatial" / POSITIONS_V1).is_file():
        expected = "Space Ranger 1.x Visium `outs` folder"
    elif (folder / "spatial" / POSITIONS_V2).is_file():
        expected = "Space Ranger 2.0+ Visium `outs` folder"
    else:
        expected = f"Space Ranger Visium `outs` folder (spatial/{POSITIONS_V2} from 2.0, {POSITIONS_V1} in 1.x)"
    _check_folder(folder, "Visium", expected)
    counts_file = str(options.get("counts_file"))
    counts = _visium_counts(folder, counts_file)
    problems = _file(
        counts,
        counts_file if counts is None else counts.name,
        f"the counts matrix (also accepted as `<library_id>_{counts_file}`; for another file, e.g. "
        "raw_feature_bc_matrix.h5, pass `counts_file=`)",
    )

    positions = options.get("tissue_positions_file")
    if positions is not None:
        rel = str(positions)
        if not (folder / positions).is_file():
            problems.append(f"{rel}: the spot positions given as `tissue_positions_file=` (relative to the folder)")
        elif POSITIONS_V1 not in rel and POSITIONS_V2 not in rel:
            problems.append(
                f"{rel}: spatialdata-io reads the positions only from files named {POSITIONS_V2} or {POSITIONS_V1}"
            )
        else:
            problems += _file(folder / positions, rel, "the spot positions")
    else:
        name = POSITIONS_V1 if (folder / "spatial" / POSITIONS_V1).is_file() else POSITIONS_V2
        problems += _file(
            folder / "spatial" / name,
            f"spatial/{name}",
            f"the spot positions (Space Ranger 1.x names it spatial/{POSITIONS_V1}; elsewhere: pass "
            "`tissue_positions_file=`)",
        )

    scale = options.get("scalefactors_file")
    scale_rel = str(scale) if scale is not None else f"spatial/{SCALEFACTORS}"
    scale_path = folder / scale if scale is not None else folder / "spatial" / SCALEFACTORS
    if not scale_path.is_file():
        problems.append(f"{scale_rel}: the scale factors (spot diameter and image scales)")
    else:
        problems += _json_keys(scale_path, scale_rel, VISIUM_SCALE_KEYS, "the scale factors")[1]

    full = None if image_file is None else folder / image_file
    for name in (HIRES, LOWRES):  # spatialdata-io reads every one present
        if (folder / "spatial" / name).is_file():
            problems += _file(folder / "spatial" / name, f"spatial/{name}", "an H&E image")
    if full is not None and full.is_file():
        problems += _file(full, str(image_file), "the full-resolution image given as `image_file=`")
    images = {
        "full": full is not None and full.is_file(),
        "hires": (folder / "spatial" / HIRES).is_file(),
        "lowres": (folder / "spatial" / LOWRES).is_file(),
    }
    if full is not None and not images["full"]:
        problems.append(f"{image_file}: the full-resolution image given as `image_file=` (relative to the folder)")
    elif image_resolution == "full" and full is None:
        problems.append("the full-resolution H&E: image_resolution='full' needs `image_file=`")
    elif image_resolution in ("hires", "lowres") and not images[image_resolution]:
        name = HIRES if image_resolution == "hires" else LOWRES
        problems.append(f"spatial/{name}: the image that image_resolution={image_resolution!r} asks for")
    elif image_resolution == "auto" and not any(images.values()):
        problems.append(
            f"an H&E image: spatial/{HIRES} or spatial/{LOWRES}, or the full-resolution image as `image_file=`"
        )
    _raise(folder, "Visium", expected, problems)


# --------------------------------------------------------------------------- Visium HD (Space Ranger 3.0+)


def _hd_feature_slice(folder: Path, dataset_id: str | None) -> list[str]:
    what = "the feature slice file with the HD layout"
    names = [FEATURE_SLICE] + ([f"{dataset_id}_{FEATURE_SLICE}"] if dataset_id is not None else [])
    path = next((folder / n for n in names if (folder / n).is_file()), None)
    if path is None and dataset_id is None:
        prefixed = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(f"_{FEATURE_SLICE}"))
        if len(prefixed) > 1:
            return [f"one {FEATURE_SLICE}: found several {[p.name for p in prefixed]}; pass `dataset_id=` to choose"]
        path = prefixed[0] if prefixed else None
        names = [FEATURE_SLICE, f"<dataset_id>_{FEATURE_SLICE}"]
    rel = path.name if path is not None else " or ".join(names)
    return _file(path, rel, what)


def _hd_global_scalefactors(folder: Path) -> list[str]:
    # the file spatialdata-io reads: segmented_outputs/spatial/…, else the first one anywhere below the folder
    path = folder / SEGMENTED / "spatial" / SCALEFACTORS
    if not path.is_file():
        path = next((p for p in folder.rglob("*") if p.name.endswith(SCALEFACTORS)), None)
    if path is None:
        return [f"spatial/{SCALEFACTORS}: the scale factors of the hires and lowres images"]
    return _json_keys(path, str(path.relative_to(folder)), HD_GLOBAL_SCALE_KEYS, "the scale factors")[1]


def _hd_bin(bin_dir: Path, rel: str, counts_file: str) -> list[str]:
    problems = _file(bin_dir / counts_file, f"{rel}/{counts_file}", "the bins' counts matrix")
    positions = bin_dir / "spatial" / "tissue_positions.parquet"
    if not positions.is_file():
        problems.append(f"{rel}/spatial/tissue_positions.parquet: the bins' positions")
    else:
        import pyarrow.parquet as pq

        try:
            columns = tuple(pq.read_schema(positions).names)
        except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
            columns = (f"unreadable: {error}",)
        if columns[: len(HD_POSITION_COLUMNS)] != HD_POSITION_COLUMNS:
            problems.append(
                f"{rel}/spatial/tissue_positions.parquet: the bins' positions, must have the columns "
                f"{list(HD_POSITION_COLUMNS)} in this order; it has {list(columns)}"
            )
    scale_path = bin_dir / "spatial" / SCALEFACTORS
    if not scale_path.is_file():
        problems.append(f"{rel}/spatial/{SCALEFACTORS}: the bins' scale factors (bin size in µm and in pixels)")
        return problems
    what = "the bins' scale factors"
    content, issues = _json_keys(scale_path, f"{rel}/spatial/{SCALEFACTORS}", HD_BIN_SCALE_KEYS, what)
    problems += issues
    if content is not None and not issues:
        size = float(_BIN_DIR.match(bin_dir.name).group(1))  # type: ignore[union-attr]
        try:
            bin_um, diameter, um_px = (float(content[k]) for k in HD_BIN_SCALE_KEYS)
            consistent = bin_um == size and diameter > 0 and abs(bin_um / diameter - um_px) <= 1e-8 + 1e-5 * abs(um_px)
        except (TypeError, ValueError):
            consistent = False
        if not consistent:
            problems.append(
                f"{rel}/spatial/{SCALEFACTORS}: the bins' scale factors must give bin_size_um = {size:g} (the folder's "
                f"bin size) and microns_per_pixel = bin_size_um / spot_diameter_fullres; they give "
                f"{ {k: content[k] for k in HD_BIN_SCALE_KEYS} }"
            )
    return problems


def _hd_bins(folder: Path, options: Mapping[str, Any]) -> list[str]:
    root = folder / BINNED if (folder / BINNED).is_dir() else folder
    rel_root = BINNED if root != folder else "."
    present = sorted(p.name for p in root.iterdir() if p.is_dir() and _BIN_DIR.match(p.name))
    if not present:
        return [f"{BINNED}/square_<NNN>um/: the binned outputs (at least one bin size, e.g. {BINNED}/square_008um/)"]
    requested = options.get("bin_size")
    wanted = present
    problems = []
    if requested is not None and not (isinstance(requested, list | tuple) and len(requested) == 0):
        sizes = [requested] if isinstance(requested, int) else list(requested)
        wanted = [f"square_{int(b):03d}um" for b in sizes]
        problems += [
            f"{rel_root}/{name}/: the bin size asked for by bin_size={requested!r} (present: {present})"
            for name in wanted
            if name not in present
        ]
        wanted = [name for name in wanted if name in present]
    counts_file = f"{'filtered' if options.get('filtered_counts_file', True) else 'raw'}_feature_bc_matrix.h5"
    for name in wanted:
        problems += _hd_bin(root / name, f"{rel_root}/{name}" if rel_root != "." else name, counts_file)
    return problems


def _hd_images(folder: Path, image_file: str | Path | None, image_resolution: str) -> list[str]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    microscope = folder / "microscope_image"
    images = {
        "full": (Path(image_file).is_file() if image_file is not None else False)
        or (microscope.is_dir() and any(p.is_file() for p in microscope.iterdir()))
        or any(re.fullmatch(r".*tissue_image\.[^.]+", p.name) and p.parent == folder for p in files),
        "hires": any(HIRES in str(p) for p in files),
        "lowres": any(LOWRES in str(p) for p in files),
    }
    if image_file is not None and not Path(image_file).is_file():
        return [f"{image_file}: the full-resolution image given as `image_file=`"]
    problems = [
        problem
        for name in (HIRES, LOWRES)  # spatialdata-io reads the first file whose path contains the name
        for path in [next((p for p in files if name in str(p)), None)]
        if path is not None
        for problem in _file(path, str(path.relative_to(folder)), "an H&E image")
    ]
    if problems:
        return problems
    if image_resolution in images and not images[image_resolution]:
        where = {"full": "microscope_image/ or `image_file=`", "hires": HIRES, "lowres": LOWRES}[image_resolution]
        return [f"{where}: the {image_resolution} image that image_resolution={image_resolution!r} asks for"]
    if image_resolution == "auto" and not any(images.values()):
        return [f"an H&E image: spatial/{HIRES}, spatial/{LOWRES}, or the full-resolution image as `image_file=`"]
    return []


def check_visium_hd_layout(
    folder: Path,
    *,
    options: Mapping[str, Any],
    dataset_id: str | None,
    image_file: str | Path | None,
    image_resolution: str,
) -> None:
    """Raise one InputError naming every piece of a Visium HD ``outs`` folder that spatialdata-io lacks.

    Parameters
    ----------
    folder
        The folder passed to the reader.
    options
        The options :func:`spatialdata_io.visium_hd` runs with (``bin_size``, ``filtered_counts_file``,
        ``load_segmentations_only``), see :func:`reader_options`.
    dataset_id
        The prefix of the file names, if given.
    image_file
        The full-resolution image given by the user, if any.
    image_resolution
        ``"auto"``, ``"full"``, ``"hires"`` or ``"lowres"``: which image must be present.
    """
    expected = "Space Ranger 3.0+ Visium HD `outs` folder (feature_slice.h5, spatial/, binned_outputs/square_NNNum/)"
    _check_folder(folder, "Visium HD", expected)
    problems = _hd_feature_slice(folder, dataset_id) + _hd_global_scalefactors(folder)
    if options.get("load_segmentations_only"):
        problems += [
            f"{SEGMENTED}/{name}: the cell segmentation asked for by load_segmentations_only=True"
            for name in ("filtered_feature_cell_matrix.h5", "cell_segmentations.geojson")
            if not (folder / SEGMENTED / name).is_file()
        ]
    else:
        problems += _hd_bins(folder, options)
    problems += _hd_images(folder, image_file, image_resolution)
    _raise(folder, "Visium HD", expected, problems)


# --------------------------------------------------------------------------- Xenium


def check_xenium_layout(folder: Path, *, options: Mapping[str, Any], source_image_key: str) -> None:
    """Raise one InputError naming every file of a Xenium output folder that spatialdata-io lacks.

    Parameters
    ----------
    folder
        The folder passed to the reader.
    options
        The options :func:`spatialdata_io.xenium` runs with (which elements it reads), see :func:`reader_options`.
    source_image_key
        The element the H&E becomes; ``"he_image"`` (or ``"if_image"``) is read from ``*he_image.ome.tif`` with its
        ``*he_imagealignment.csv``.
    """
    expected = "Xenium Onboard Analysis output folder (experiment.xenium, cells.zarr.zip, cell_feature_matrix.h5, ...)"
    _check_folder(folder, "Xenium", expected)
    needed = {"experiment.xenium": "the run specification", "cells.zarr.zip": "the cell masks and ids"}
    table = options.get("cells_table", True) or any(
        options.get(k) for k in ("cells_as_circles", "cells_boundaries", "nucleus_boundaries")
    )
    if table:
        needed |= {"cell_feature_matrix.h5": "the cell counts", "cells.parquet": "the cell metadata"}
    for option, name, what in (
        ("cells_boundaries", "cell_boundaries.parquet", "the cell boundaries"),
        ("nucleus_boundaries", "nucleus_boundaries.parquet", "the nucleus boundaries"),
        ("transcripts", "transcripts.parquet", "the transcripts"),
    ):
        if options.get(option):
            needed[name] = f"{what} (or pass `{option}=False`)"
    problems = [p for name, what in needed.items() for p in _file(folder / name, name, what)]
    if (folder / "experiment.xenium").is_file() and (folder / "experiment.xenium").stat().st_size:
        spec = folder / "experiment.xenium"
        problems = _json_keys(spec, spec.name, (), "the run specification")[1] + problems
    if options.get("morphology_focus") and not (
        (folder / "morphology_focus.ome.tif").is_file() or (folder / "morphology_focus").is_dir()
    ):
        problems.append(
            "morphology_focus/ (XOA 2.0+) or morphology_focus.ome.tif (1.x): the morphology image (or pass "
            "`morphology_focus=False`)"
        )
    if source_image_key in ("he_image", "if_image"):
        suffix = f"{source_image_key}.ome.tif"
        if not options.get("aligned_images", True):
            problems.append(f"*{suffix}: the H&E is read only with aligned_images=True")
        else:
            image = next((p for p in sorted(folder.glob(f"*{suffix}")) if p.is_file()), None)
            if image is None:
                problems.append(
                    f"*{suffix}: the post-Xenium H&E (for an H&E registered elsewhere use "
                    "st.io.from_image_and_table, or add it with spatialdata_io.xenium_aligned_image and pass "
                    "`source_image_key=`)"
                )
            elif not (folder / image.name.replace(".ome.tif", "alignment.csv")).is_file():
                problems.append(
                    f"{image.name.replace('.ome.tif', 'alignment.csv')}: the alignment of {image.name} to the "
                    "morphology image (without it the H&E would be placed unregistered)"
                )
    _raise(folder, "Xenium", expected, problems)
