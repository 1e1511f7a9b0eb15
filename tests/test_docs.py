"""The documentation: the API page lists every public name, the pages cite only public names, and the pages that
``docs/conf.py`` generates (API lists, benchmark results, tutorials) come out as expected."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
from pathlib import Path

import pytest

import stpredict as st

ROOT = Path(__file__).parents[1]
DOCS = ROOT / "docs"


def _docs_ext():
    spec = importlib.util.spec_from_file_location("stpredict_docs", DOCS / "_ext" / "stpredict_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_api_lists_are_the_public_names(tmp_path):
    """Each generated autosummary block lists exactly ``__all__`` of its namespace, and every name resolves."""
    ext = _docs_ext()
    assert set(ext.NAMESPACES) == {"io", "datasets", "pp", "models", "tl", "pl", "errors"}
    files = ext.write_api(tmp_path)
    assert [f.name for f in files] == [f"_api_{ns}.md" for ns in ext.NAMESPACES]
    for namespace, path in zip(ext.NAMESPACES, files, strict=True):
        listed = re.findall(rf"^   {namespace}\.(\w+)$", path.read_text(), flags=re.MULTILINE)
        assert listed == sorted(getattr(st, namespace).__all__), namespace
        assert ":toctree: generated" in path.read_text()


def test_api_page_includes_every_namespace_and_settings():
    page = (DOCS / "api.md").read_text()
    for namespace in _docs_ext().NAMESPACES:
        assert f"{{include}} _api_{namespace}.md" in page
        assert f".. module:: stpredict.{namespace}" in page
    assert ".. data:: settings" in page
    assert "_settings.Settings" in page
    # every public top-level name is documented: the subpackages above, settings and the version
    assert set(st.__all__) == {*_docs_ext().NAMESPACES, "settings", "__version__"}


def test_api_names_fail_loudly_for_a_name_that_does_not_resolve(monkeypatch):
    ext = _docs_ext()
    monkeypatch.setattr(st.pp, "__all__", [*st.pp.__all__, "no_such_function"])
    with pytest.raises(AttributeError, match="no_such_function"):
        ext.api_names("pp")


def test_readme_docs_and_tutorials_call_only_public_names():
    """Every ``st.<sub>.<name>`` and ``st.settings.<field>`` written in the README, docs and tutorials exists."""
    texts = [ROOT / "README.md", *sorted(DOCS.glob("*.md")), *sorted((ROOT / "tutorials").glob("*.md"))]
    fields = {f.name for f in dataclasses.fields(st.settings)}
    missing = set()
    for path in texts:
        text = path.read_text()
        for sub, name in re.findall(r"\bst\.(io|datasets|pp|models|tl|pl)\.(\w+)", text):
            if name not in getattr(st, sub).__all__:
                missing.add(f"{path.name}: st.{sub}.{name}")
        fields_cited = re.findall(r"\bst\.settings\.(\w+)", text)
        missing |= {f"{path.name}: st.settings.{n}" for n in fields_cited if n not in fields}
    assert not missing, sorted(missing)


def test_benchmark_page_shows_rows_machine_and_plots(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    rows = [
        {"model": m, "eval_um": 8.0, "reference": "truth", "pcc_m": v, "spot_pcc": 0.5, "n_bins": 10}
        for m, v in (("pixnet", 0.41), ("magnet", 0.2))
    ]
    (results / "models.json").write_text(
        json.dumps({"rows": rows, "machine": {"platform": "Linux-x", "cpus": 2}, "total_s": 12.5, "fit_s": 3.25})
    )
    (results / "magnet.json").write_text(json.dumps({"partial": True, "per_seed": [{"seed": 0, "rows": rows}]}))
    (results / "broken.json").write_text("{not json")
    out = tmp_path / "out"
    page = _docs_ext().write_benchmarks(results, out).read_text()

    assert "from the 3 file(s)" in page
    assert "**Machine:** Linux-x, 2 CPUs." in page  # as recorded in the file
    assert "**Machine:** not recorded in this file (a partial run)." in page
    assert "Written by `benchmarks/bench_models.py`" in page
    assert "Written by `benchmarks/bench_magnet.py`" in page
    assert "| model | eval_um | reference | PCC@M | spot-wise PCC | units |" in page
    assert "| pixnet | 8 | truth | 0.41 | 0.5 | 10 |" in page
    assert "could not be read (JSONDecodeError" in page
    assert sorted(p.name for p in out.glob("*.png")) == ["magnet_pcc_m.png", "models_pcc_m.png", "models_timings.png"]
    assert "![PCC@M by model, models](generated/benchmarks/models_pcc_m.png)" in page


def test_benchmark_page_without_results_says_so(tmp_path):
    page = _docs_ext().write_benchmarks(tmp_path / "absent", tmp_path / "out").read_text()
    assert "from the 0 file(s)" in page
    assert "No benchmark results are in this checkout" in page


def test_tutorials_become_notebooks_with_an_index(tmp_path):
    src, dst = tmp_path / "tutorials", tmp_path / "docs_tutorials"
    src.mkdir()
    (src / "b_second.md").write_text("# Second\n\nText.\n\n```python\nx = 1 + 1\n```\n\n```python\nprint(x)\n```\n")
    (src / "a_first.md").write_text("# First\n\n```python\nimport stpredict as st\n```\n")
    dst.mkdir()
    (dst / "retired.ipynb").write_text("{}")
    written = _docs_ext().write_tutorials(src, dst)

    assert [p.name for p in written] == ["a_first.ipynb", "b_second.ipynb"]
    assert not (dst / "retired.ipynb").exists()
    notebook = json.loads((dst / "b_second.ipynb").read_text())
    code = ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]
    assert code == ["x = 1 + 1", "print(x)"]
    assert notebook["metadata"]["kernelspec"]["name"] == "python3"
    index = (dst / "index.md").read_text()
    assert index.index("a_first") < index.index("b_second")
    assert "{toctree}" in index
