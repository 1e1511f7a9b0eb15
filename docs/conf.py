"""Sphinx configuration of the stpredict documentation.

Build with ``docs/build.sh`` (``sphinx-build -W --keep-going -b html docs docs/_build/html``). Before Sphinx reads a
page, this file

- converts the tutorials (``tutorials/*.md``, jupytext markdown) into notebooks under ``docs/tutorials/``
  (git-ignored), which myst-nb executes: ``STPREDICT_DOCS_EXECUTE=0`` builds without running them;
- writes the autosummary lists of the API page from each namespace's ``__all__`` into ``docs/_api_<namespace>.md``;
- writes the benchmark tables and plots from ``benchmarks/results/*.json`` into ``docs/generated/benchmarks/``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(DOCS / "_ext"))

import stpredict_docs  # noqa: E402  (docs/_ext, put on the path just above)

import stpredict  # noqa: E402

project = "stpredict"
author = "stpredict developers"
copyright = "stpredict developers"
release = stpredict.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

# ---------------------------------------------------------------- sources
EXECUTE = os.environ.get("STPREDICT_DOCS_EXECUTE", "1") != "0"
for stub in (DOCS / "generated").glob("stpredict.*.rst"):  # autosummary never removes stubs of retired names
    stub.unlink()
API_LISTS = stpredict_docs.write_api(DOCS)
stpredict_docs.write_tutorials(ROOT / "tutorials", DOCS / "tutorials")
stpredict_docs.write_benchmarks(ROOT / "benchmarks" / "results", DOCS / "generated" / "benchmarks")

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}  # .rst first: autosummary stubs
exclude_patterns = ["_build", "generated/benchmarks/*.md", "_api_*.md", "**.ipynb_checkpoints", ".DS_Store"]
templates_path = ["_templates"]

# ---------------------------------------------------------------- MyST and notebooks
myst_enable_extensions = ["colon_fence", "deflist", "dollarmath", "substitution"]
myst_heading_anchors = 3
nb_execution_mode = "force" if EXECUTE else "off"
nb_execution_timeout = 600
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_execution_in_temp = True  # files a tutorial writes (checkpoints, zarr stores) go to a temporary folder
nb_merge_streams = True
# Progress bars would print carriage-return frames into the pages; matplotlib draws into the notebook.
os.environ.setdefault("MPLBACKEND", "Agg")

# ---------------------------------------------------------------- API reference
autosummary_generate = ["api.md", *(p.name for p in API_LISTS)]  # the lists api.md includes
autosummary_imported_members = True
autodoc_default_options = {"member-order": "bysource"}
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_preserve_defaults = True
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
napoleon_use_ivar = False

# ---------------------------------------------------------------- HTML
html_theme = "furo"
html_title = f"stpredict {release}"
html_static_path: list[str] = []
