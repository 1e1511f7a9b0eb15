"""One rule for every function that writes SpatialData elements (images, labels, points, shapes, tables).

A writer names every element it is about to write, with its type, and calls :func:`check_new_elements` before any
work; only when all keys pass does it compute, and then it writes them together with :func:`add_elements`. The rule:

* a key that exists is refused unless ``overwrite=True``, which replaces an element of the *same* type only:
  spatialdata keys are unique across element types, and a result never silently replaces, say, the image it was
  computed from or the measured table under the same name;
* a key that differs from an existing one only in case, or that is not a valid element name, is always refused
  (spatialdata refuses both, but only at the write, after the work and possibly after another element was written);
* an element that a table not written in the same call annotates is not replaced: that table would then point at
  other units;
* with ``on_disk=True`` (a writer that writes into the zarr store of a backed SpatialData), elements that exist in
  the store but not in memory are checked the same way.

One error lists every collision of the call, the existing element and its type, and the fix.

Every write to zarr runs inside :func:`quiet_zarr_writes`, which silences the one third-party warning that such a
write repeats for every array and that a user cannot act on.
"""

from __future__ import annotations

import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ._errors import InputError
from ._logging import get_logger

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

    from spatialdata import SpatialData

__all__ = ["ELEMENT_TYPES", "ElementType", "add_elements", "check_new_elements", "quiet_zarr_writes"]

logger = get_logger(__name__)

ElementType = Literal["images", "labels", "points", "shapes", "tables"]
#: spatialdata's element groups, in its own order.
ELEMENT_TYPES: tuple[ElementType, ...] = ("images", "labels", "points", "shapes", "tables")

_SINGULAR = {"images": "image", "labels": "labels element", "points": "points element", "shapes": "shapes element",
             "tables": "table"}  # fmt: skip
_ARTICLE = {"images": "an", "labels": "a", "points": "a", "shapes": "a", "tables": "a"}


def _describe(kind: str, key: str) -> str:
    return f"{_SINGULAR[kind]} {key!r}"


def check_new_elements(
    sdata: SpatialData,
    new: Mapping[str, ElementType],
    *,
    overwrite: bool,
    on_disk: bool = False,
    param: str = "key_added",
) -> None:
    """Raise :class:`~stpredict._errors.InputError` unless every element in ``new`` may be written into ``sdata``.

    Call it before any work, with every key the call writes (a table and the shapes written beside it, say).

    Parameters
    ----------
    sdata
        The SpatialData written into.
    new
        Key → element type (``"images"``, ``"labels"``, ``"points"``, ``"shapes"``, ``"tables"``) of each element
        the call will write.
    overwrite
        Allow replacing an existing element of the same type.
    on_disk
        Also check the zarr store of a backed ``sdata`` (for writers that write there, not only in memory).
    param
        The argument that chooses the key, named in the message.
    """
    unknown = {k: v for k, v in new.items() if v not in ELEMENT_TYPES}
    if unknown:
        msg = f"Unknown element types {unknown}; use one of {ELEMENT_TYPES}."
        raise ValueError(msg)
    where = {(kind, key): f"sdata.{kind}[{key!r}]" for kind in ELEMENT_TYPES for key in getattr(sdata, kind)}
    if on_disk and sdata.is_backed():
        in_store = {pair: f"{pair[0]}/{pair[1]} in the zarr store {sdata.path}" for pair in _on_disk(sdata)}
        where = in_store | where  # an element in memory is named there
    existing, problems, replaced = _collisions(new, where)
    if overwrite:
        existing = []
    problems = _name_problems(new) + problems + _annotating_tables(sdata, replaced, new)
    if not (problems or existing):
        return
    if problems:
        fix = f"choose another `{param}=`"
    else:
        fix = f"pass `overwrite=True` to replace {'it' if len(existing) == 1 else 'them'}, or another `{param}=`"
    writes = ", ".join(_describe(kind, key) for key, kind in new.items())
    msg = f"This call writes {writes}, but {'; '.join(existing + problems)}. To go ahead, {fix}."
    raise InputError(msg)


def _name_problems(new: Mapping[str, str]) -> list[str]:
    """Keys that are no valid element names, or that repeat in one call (spatialdata ignores case)."""
    from spatialdata._core.validation import check_valid_name

    problems, seen = [], {}
    for key in new:
        try:
            check_valid_name(key)
        except (TypeError, ValueError) as error:
            problems.append(f"{key!r} is not a valid element name: {error}")
        if key.lower() in seen:
            problems.append(f"{key!r} and {seen[key.lower()]!r} are the same key twice (spatialdata ignores case)")
        seen[key.lower()] = key
    return problems


def _collisions(
    new: Mapping[str, str], where: dict[tuple[str, str], str]
) -> tuple[list[str], list[str], set[tuple[str, str]]]:
    """Existing elements of the same type (``overwrite`` replaces them), other collisions, and the pairs replaced."""
    existing, problems, replaced = [], [], set()
    for key, kind in new.items():
        for other_kind, other in sorted(where):
            place = where[other_kind, other]
            if other == key and other_kind == kind:
                existing.append(f"{_describe(kind, key)} already exists ({place})")
                replaced.add((kind, key))
            elif other == key:
                problems.append(
                    f"{key!r} is already {_ARTICLE[other_kind]} {_SINGULAR[other_kind]} ({place}); spatialdata keys "
                    "are unique across element types, and `overwrite=True` replaces only an element of the same type"
                )
            elif other.lower() == key.lower():
                problems.append(
                    f"{key!r} differs only in case from {_describe(other_kind, other)} ({place}); spatialdata keys "
                    "must be unique regardless of case"
                )
    return existing, problems, replaced


def _on_disk(sdata: SpatialData) -> set[tuple[str, str]]:
    """(type, key) of the elements in the zarr store of a backed ``sdata`` (read from its folders)."""
    root = Path(sdata.path)
    return {(kind, p.name) for kind in ELEMENT_TYPES if (root / kind).is_dir() for p in (root / kind).iterdir()
            if p.is_dir() and not p.name.startswith(".")}  # fmt: skip


def _annotating_tables(sdata: SpatialData, replaced: set[tuple[str, str]], new: Mapping[str, str]) -> list[str]:
    """Problems for replaced non-table elements that a table, not rewritten in this call, annotates."""
    problems = []
    for kind, key in sorted(replaced):
        if kind == "tables":
            continue
        for name, table in sdata.tables.items():
            if new.get(name) == "tables":
                continue
            region = table.uns.get("spatialdata_attrs", {}).get("region")
            regions = [region] if isinstance(region, str) else list(region or [])
            if key in regions:
                problems.append(
                    f"table {name!r} annotates {_describe(kind, key)}; replacing it would leave that table pointing at "
                    f"other units (delete the table first if it is no longer needed: `del sdata.tables[{name!r}]`)"
                )
    return problems


def add_elements(sdata: SpatialData, elements: Mapping[str, tuple[ElementType, Any]]) -> None:
    """Write ``elements`` (key → (type, element)) into ``sdata`` in memory, in order, logging what each replaces.

    Call :func:`check_new_elements` with the same keys first, before the work that builds the elements.
    """
    for key, (kind, element) in elements.items():
        group = getattr(sdata, kind)
        if key in group:
            logger.info("Replaced sdata.%s[%r].", kind, key)
        group[key] = element


#: anndata (0.12) warns once per array of every table it writes to zarr v3 while ``anndata.settings.auto_shard_zarr_v3``
#: is unset: about 15 times per table, announcing a future default; nothing in the message is about the write at hand.
ZARR_AUTOSHARD_WARNING = re.escape("zarr v3 autosharding will be the default")


@contextmanager
def quiet_zarr_writes() -> Iterator[None]:
    """Silence anndata's "zarr v3 autosharding will be the default" :class:`UserWarning` inside the block.

    Wrap every write of stpredict to zarr (``SpatialData.write``, ``write_element``) in it. Only that message is
    ignored; every other warning passes, and a user who sets ``anndata.settings.auto_shard_zarr_v3`` gets what
    they chose (anndata then does not warn). :func:`warnings.catch_warnings` restores the filters on exit.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=ZARR_AUTOSHARD_WARNING, category=UserWarning)
        yield
