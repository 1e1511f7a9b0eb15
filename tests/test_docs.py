from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import stpredict as st

ROOT = Path(__file__).parents[1]


def _make_api():
    spec = importlib.util.spec_from_file_location("make_api", ROOT / "docs" / "make_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_api_page_is_current():
    page = (ROOT / "docs" / "api.md").read_text()
    assert page == _make_api().render(), "docs/api.md is stale: run `python docs/make_api.py`"


def test_api_page_lists_every_public_name():
    page = (ROOT / "docs" / "api.md").read_text()
    for sub in ("io", "datasets", "pp", "models", "tl", "pl"):
        for name in getattr(st, sub).__all__:
            assert f"`st.{sub}.{name}" in page


def test_readme_and_docs_call_only_public_names():
    """Every ``st.<sub>.<name>`` written in the README, docs and tutorials exists (no retired name survives)."""
    texts = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "tutorials").glob("*.md"))]
    missing = set()
    for path in texts:
        for sub, name in re.findall(r"\bst\.(io|datasets|pp|models|tl|pl)\.(\w+)", path.read_text()):
            if name not in getattr(st, sub).__all__:
                missing.add(f"{path.name}: st.{sub}.{name}")
    assert not missing, sorted(missing)
