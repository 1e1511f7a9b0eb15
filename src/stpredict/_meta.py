"""Provenance and value semantics of elements that stpredict writes.

SpatialData does not persist an element's ``attrs`` in zarr, so the same record is kept in two places:
``element.attrs["stpredict"]`` (in memory, travels with the element) and
``sdata.attrs["stpredict"]["elements"][key]`` (persisted with the SpatialData).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._keys import Attrs

if TYPE_CHECKING:
    from spatialdata import SpatialData

__all__ = ["get_element_meta", "set_element_meta"]


def set_element_meta(sdata: SpatialData, key: str, element: Any, meta: dict[str, Any]) -> None:
    """Record ``meta`` (JSON-serialisable) for element ``key`` on the element and in ``sdata.attrs``."""
    element.attrs[Attrs.root] = dict(meta)
    root = sdata.attrs.setdefault(Attrs.root, {})
    root.setdefault("elements", {})[key] = dict(meta)


def get_element_meta(sdata: SpatialData, key: str, element: Any | None = None) -> dict[str, Any]:
    """The record for element ``key``: from the element's attrs, else from ``sdata.attrs``, else ``{}``."""
    if element is not None and Attrs.root in element.attrs:
        return dict(element.attrs[Attrs.root])
    return dict(sdata.attrs.get(Attrs.root, {}).get("elements", {}).get(key, {}))
