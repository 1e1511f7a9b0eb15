"""One rule for every writer of SpatialData elements: an existing key is refused, before any work and any write,
unless ``overwrite=True`` replaces an element of the same type; an element of another type is never replaced.

Every writer (tl.predict_dense, tl.aggregate by bins, shapes and labels, pp.bin_counts, pp.tissue_mask) runs against
a SpatialData where a key it writes already exists: it must raise, leave every element the same object with the same
values and add none, and with ``overwrite=True`` (same type) write exactly what it writes into a clean SpatialData.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import _training_data as helpers
import geopandas as gpd
import numpy as np
import pytest
import shapely
from anndata import AnnData
from spatialdata import deepcopy as sd_deepcopy
from spatialdata.models import Image2DModel, Labels2DModel, ShapesModel, TableModel
from spatialdata.transformations import get_transformation

import stpredict as st
from stpredict._elements import ELEMENT_TYPES, add_elements, check_new_elements
from stpredict._geometry import scale_levels
from stpredict._meta import set_element_meta
from stpredict.errors import InputError

if TYPE_CHECKING:
    from collections.abc import Callable

    from spatialdata import SpatialData

KEY = "result"
GENES = ["g0", "g1", "g2"]


@pytest.fixture(autouse=True)
def _no_progress_bars(monkeypatch):
    monkeypatch.setattr(st.settings, "show_progress_bar", False)


class MeanColourModel:
    """A numpy stand-in for a dense model: each output pixel is a mix of the mean colour of its stride block."""

    name = "colour"
    value_kind = "intensive"
    var_names = GENES
    um_per_px = 1.0
    output_stride = 4
    tile_size = 32
    context = 0

    def predict_tiles(self, tiles: np.ndarray, *, device: str = "auto") -> np.ndarray:
        b, c, h, w = tiles.shape
        s = self.output_stride
        blocks = tiles.astype(np.float32).reshape(b, c, h // s, s, w // s, s).mean(axis=(3, 5)) / 255
        return np.stack([blocks[:, 0], blocks[:, 1] - blocks[:, 2], blocks.sum(axis=1)], axis=1).astype(np.float32)


@pytest.fixture(scope="module")
def base() -> SpatialData:
    """Image ``he`` (1 µm/px), spots + raw-count table, an intensive map ``pred`` and labels ``cells`` on it."""
    sdata = helpers.make_sdata(size=96, spacing=16.0, radius=6.0)
    he = sdata.images["he"]
    transformations = get_transformation(he, get_all=True)
    rgb = np.asarray(he.data, dtype=np.float32) / 255
    values = np.stack([rgb[0], rgb[1] - rgb[2], rgb.sum(axis=0)]).astype(np.float32)
    sdata.images["pred"] = Image2DModel.parse(
        values, dims=("c", "y", "x"), c_coords=GENES, transformations=dict(transformations)
    )
    set_element_meta(sdata, "pred", sdata.images["pred"], {"value_kind": "intensive"})
    sdata.images["pred2"] = Image2DModel.parse(
        values[::-1].copy(), dims=("c", "y", "x"), c_coords=GENES, transformations=dict(transformations)
    )
    set_element_meta(sdata, "pred2", sdata.images["pred2"], {"value_kind": "intensive"})
    cells = (np.arange(6 * 6, dtype=np.int32).reshape(6, 6) + 1).repeat(16, 0).repeat(16, 1)
    sdata.labels["cells"] = Labels2DModel.parse(cells, dims=("y", "x"), transformations=dict(transformations))
    return sdata


@dataclass(frozen=True)
class Writer:
    """A writer called with ``key_added``, and the elements (key: type) it writes for that key."""

    call: Callable[..., Any]
    writes: dict[str, str]


WRITERS = {
    "tl.predict_dense": Writer(
        lambda sd, key, **kw: st.tl.predict_dense(sd, MeanColourModel(), key_added=key, tissue_only=False, **kw),
        {KEY: "images"},
    ),
    "tl.aggregate(bin_size)": Writer(
        lambda sd, key, **kw: st.tl.aggregate(sd, "pred", bin_size=16, tissue_key=False, key_added=key, **kw),
        {KEY: "tables", f"{KEY}_bins": "shapes"},
    ),
    "tl.aggregate(shapes_key)": Writer(
        lambda sd, key, **kw: st.tl.aggregate(sd, "pred", shapes_key="spots", key_added=key, **kw),
        {KEY: "tables"},
    ),
    "tl.aggregate(labels_key)": Writer(
        lambda sd, key, **kw: st.tl.aggregate(sd, "pred", labels_key="cells", key_added=key, **kw),
        {KEY: "tables"},
    ),
    "pp.bin_counts": Writer(
        lambda sd, key, **kw: st.pp.bin_counts(sd, "table", bin_size=16, key_added=key, **kw),
        {KEY: "tables", f"{KEY}_bins": "shapes"},
    ),
    "tl.ensemble_maps": Writer(
        lambda sd, key, **kw: st.tl.ensemble_maps(sd, map_keys=["pred", "pred2"], key_added=key, **kw),
        {KEY: "images", f"{KEY}_sd": "images"},
    ),
    "pp.tissue_mask": Writer(
        lambda sd, key, **kw: st.pp.tissue_mask(sd, "he", target_um_per_px=2.0, min_area_um2=0.0, key_added=key, **kw),
        {KEY: "labels"},
    ),
}


def _element(kind: str) -> Any:
    """A small element of type ``kind`` that no writer would produce."""
    if kind == "images":
        return Image2DModel.parse(np.full((1, 4, 4), 7.0), dims=("c", "y", "x"), c_coords=["old"])
    if kind == "labels":
        return Labels2DModel.parse(np.full((4, 4), 9, dtype=np.uint8), dims=("y", "x"))
    if kind == "shapes":
        return ShapesModel.parse(
            gpd.GeoDataFrame(geometry=shapely.points([[1.0, 1.0], [2.0, 2.0]]), data={"radius": [1.0, 2.0]})
        )
    return TableModel.parse(AnnData(np.full((2, 2), 5.0, dtype=np.float32)))


def _values(element: Any) -> Any:
    """The values of an element, comparable with ``np.testing.assert_array_equal``."""
    if isinstance(element, AnnData):
        x = element.X.toarray() if hasattr(element.X, "toarray") else np.asarray(element.X)
        return x, np.asarray(element.obs_names), np.asarray(element.var_names)
    if isinstance(element, gpd.GeoDataFrame):
        return np.asarray(element.geometry.bounds), np.asarray(element.index)
    return np.asarray(scale_levels(element)[0].data)


def _assert_equal(a: Any, b: Any) -> None:
    for x, y in zip(a, b, strict=True) if isinstance(a, tuple) else [(a, b)]:
        np.testing.assert_array_equal(x, y)


def _snapshot(sdata: SpatialData) -> dict[tuple[str, str], Any]:
    return {(kind, key): element for kind, key, element in _elements(sdata)}


def _elements(sdata: SpatialData) -> list[tuple[str, str, Any]]:
    return [(kind, key, el) for kind in ELEMENT_TYPES for key, el in getattr(sdata, kind).items()]


def _assert_unchanged(sdata: SpatialData, before: dict, values: dict, attrs: dict) -> None:
    after = _snapshot(sdata)
    assert sorted(after) == sorted(before)  # nothing appeared, nothing went
    for name, element in before.items():
        assert after[name] is element
    for name, value in values.items():
        _assert_equal(_values(after[name]), value)
    assert sdata.attrs == attrs


def _other(kind: str) -> str:
    return "images" if kind == "tables" else "tables"


CASES = [
    (writer, key, kind, same)
    for writer, spec in WRITERS.items()
    for key, kind in spec.writes.items()
    for same in (True, False)
    if same or key == KEY
]


@pytest.mark.parametrize(
    ("writer", "key", "kind", "same"),
    CASES,
    ids=[f"{w}-{k}-{'same type' if s else 'other type'}" for w, k, _, s in CASES],
)
def test_writer_refuses_an_existing_key_and_changes_nothing(base, writer, key, kind, same):
    spec = WRITERS[writer]
    sdata = sd_deepcopy(base)
    existing = kind if same else _other(kind)
    getattr(sdata, existing)[key] = _element(existing)
    before, attrs = _snapshot(sdata), copy.deepcopy(sdata.attrs)
    values = {name: _values(el) for name, el in before.items() if name[1] == key}
    with pytest.raises(InputError) as info:
        spec.call(sdata, KEY)
    msg = str(info.value)
    assert f"sdata.{existing}[{key!r}]" in msg
    assert "key_added" in msg
    if same:
        assert "overwrite=True" in msg
    _assert_unchanged(sdata, before, values, attrs)

    if not same:  # overwrite never turns one type of element into another
        with pytest.raises(InputError, match="key_added"):
            spec.call(sdata, KEY, overwrite=True)
        _assert_unchanged(sdata, before, values, attrs)


@pytest.mark.parametrize("writer", list(WRITERS), ids=str)
@pytest.mark.parametrize("overwrite", [False, True])
def test_writer_says_overwrite_cannot_replace_another_type(base, writer, overwrite):
    spec = WRITERS[writer]
    sdata = sd_deepcopy(base)
    main = next(iter(spec.writes.items()))
    existing = _other(main[1])
    getattr(sdata, existing)[KEY] = _element(existing)
    with pytest.raises(InputError) as info:
        spec.call(sdata, KEY, overwrite=overwrite)
    msg = str(info.value)
    assert f"{KEY!r} is already a" in msg
    assert f"(sdata.{existing}[{KEY!r}])" in msg
    assert "`overwrite=True` replaces only an element of the same type" in msg
    assert msg.endswith("To go ahead, choose another `key_added=`.")


#: Where each writer's work starts: with an existing key, the check must refuse before it is reached.
WORK = {
    "tl.predict_dense": ("stpredict.tl._predict_dense", "plan_map"),
    "tl.aggregate(bin_size)": ("stpredict.tl._aggregate", "_bins"),
    "tl.aggregate(shapes_key)": ("stpredict.tl._aggregate", "_shapes"),
    "tl.aggregate(labels_key)": ("stpredict.tl._aggregate", "_labels"),
    "pp.bin_counts": ("stpredict.pp._bin", "apply_affine"),
    "tl.ensemble_maps": ("stpredict.tl._ensemble", "_members"),
    "pp.tissue_mask": ("stpredict.pp._tissue", "_pick_level"),
}


@pytest.mark.parametrize("writer", list(WRITERS), ids=str)
def test_writer_checks_its_keys_before_any_work(base, writer, monkeypatch):
    import importlib

    spec = WRITERS[writer]
    module, name = WORK[writer]

    def work(*args: Any, **kwargs: Any) -> None:
        msg = f"{writer} started its work ({name}) before checking its keys"
        raise AssertionError(msg)

    monkeypatch.setattr(importlib.import_module(module), name, work)
    sdata = sd_deepcopy(base)
    key, kind = list(spec.writes.items())[-1]  # the last key the writer writes (the bins shapes, where there are)
    getattr(sdata, kind)[key] = _element(kind)
    with pytest.raises(InputError, match="overwrite=True"):
        spec.call(sdata, KEY)


def _written(sdata: SpatialData, spec: Writer) -> dict[str, Any]:
    return {key: getattr(sdata, kind)[key] for key, kind in spec.writes.items()}


@pytest.mark.parametrize(("writer", "key"), [(w, k) for w, s in WRITERS.items() for k in s.writes], ids=str)
def test_writer_with_overwrite_replaces_the_element(base, writer, key):
    spec = WRITERS[writer]
    clean = sd_deepcopy(base)
    spec.call(clean, KEY)
    expected = {k: _values(el) for k, el in _written(clean, spec).items()}

    sdata = sd_deepcopy(base)
    kind = spec.writes[key]
    old = getattr(sdata, kind)[key] = _element(kind)
    untouched = {name: el for name, el in _snapshot(sdata).items() if name[1] != key}
    spec.call(sdata, KEY, overwrite=True)
    written = _written(sdata, spec)
    assert written[key] is not old
    for k, value in expected.items():
        _assert_equal(_values(written[k]), value)
    after = _snapshot(sdata)
    assert sorted(after) == sorted(untouched.keys() | {(kind, k) for k, kind in spec.writes.items()})
    for name, element in untouched.items():
        assert after[name] is element


@pytest.mark.parametrize("writer", list(WRITERS), ids=str)
def test_writer_without_inplace_writes_and_checks_nothing(base, writer):
    spec = WRITERS[writer]
    sdata = sd_deepcopy(base)
    for key, kind in spec.writes.items():
        getattr(sdata, kind)[key] = _element(kind)
    before, attrs = _snapshot(sdata), copy.deepcopy(sdata.attrs)
    assert spec.call(sdata, KEY, inplace=False) is not None
    _assert_unchanged(sdata, before, {}, attrs)


# --- the mechanism itself -----------------------------------------------------------------------------------------


def _small() -> SpatialData:
    from spatialdata import SpatialData

    return SpatialData(images={"he": _element("images")}, tables={"table": _element("tables")})


def test_every_collision_is_named_at_once():
    sdata = _small()
    sdata.shapes["t_bins"] = _element("shapes")
    sdata.tables["t"] = _element("tables")
    with pytest.raises(InputError) as info:
        check_new_elements(sdata, {"t": "tables", "t_bins": "shapes"}, overwrite=False)
    msg = str(info.value)
    assert "sdata.tables['t']" in msg
    assert "sdata.shapes['t_bins']" in msg
    assert "overwrite=True" in msg
    check_new_elements(sdata, {"t": "tables", "t_bins": "shapes"}, overwrite=True)


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_case_variant_is_refused(overwrite):
    with pytest.raises(InputError, match=r"differs only in case.*sdata\.tables\['table'\]"):
        check_new_elements(_small(), {"Table": "tables"}, overwrite=overwrite)


def test_an_invalid_name_is_refused_before_any_work():
    with pytest.raises(InputError, match=r"'a/b' is not a valid element name.*key_added"):
        check_new_elements(_small(), {"a/b": "tables"}, overwrite=False)


def test_the_same_key_twice_in_one_call_is_refused():
    with pytest.raises(InputError, match="twice"):
        check_new_elements(_small(), {"x": "tables", "X": "shapes"}, overwrite=True)


def test_an_element_annotated_by_another_table_is_not_replaced():
    sdata = _small()
    sdata.shapes["spots"] = _element("shapes")
    adata = AnnData(np.ones((2, 1), dtype=np.float32), obs={"region": ["spots"] * 2, "instance_id": [0, 1]})
    sdata.tables["measured"] = TableModel.parse(adata, region="spots", region_key="region", instance_key="instance_id")
    with pytest.raises(InputError, match=r"table 'measured'.*annotates"):
        check_new_elements(sdata, {"spots": "shapes", "new": "tables"}, overwrite=True)
    # the table that annotates it is replaced in the same call: allowed
    check_new_elements(sdata, {"spots": "shapes", "measured": "tables"}, overwrite=True)


def test_elements_on_disk_are_checked_for_a_backed_sdata(tmp_path):
    sdata = _small()
    sdata.write(tmp_path / "s.zarr")
    del sdata.tables["table"]  # gone from memory, still in the store
    check_new_elements(sdata, {"table": "tables"}, overwrite=False)  # memory only: the store is spatialdata's care
    with pytest.raises(InputError, match=r"tables/table.*overwrite=True"):
        check_new_elements(sdata, {"table": "tables"}, overwrite=False, on_disk=True)
    check_new_elements(sdata, {"table": "tables"}, overwrite=True, on_disk=True)
    with pytest.raises(InputError, match="only an element of the same type"):
        check_new_elements(sdata, {"table": "images"}, overwrite=True, on_disk=True)


def test_add_elements_logs_what_it_replaces(caplog):
    sdata = _small()
    new = _element("tables")
    with caplog.at_level("INFO", logger="stpredict"):
        add_elements(sdata, {"table": ("tables", new), "x_bins": ("shapes", _element("shapes"))})
    assert sdata.tables["table"] is new
    assert "x_bins" in sdata.shapes
    assert "Replaced sdata.tables['table']" in caplog.text
