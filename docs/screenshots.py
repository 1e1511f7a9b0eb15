"""Regenerate the README's and the docs' two screenshots from the quickstart tutorial.

Runs the code cells of ``tutorials/quickstart_synthetic.md`` (about two minutes on 2 cores), then saves::

    docs/_static/screenshots/gene_map.png   st.pl.gene_map: three genes' dense maps over the H&E, µm scale bars
    docs/_static/screenshots/compare.png    st.pl.compare: predicted vs true 8 µm bins, and the measured spots

Usage, from the repository root: ``.venv/bin/python docs/screenshots.py``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "_static" / "screenshots"


def main() -> None:
    """Run the quickstart's cells and save the two figures."""
    import jupytext

    namespace: dict = {}
    notebook = jupytext.read(ROOT / "tutorials" / "quickstart_synthetic.md")
    code = [c.source for c in notebook.cells if c.cell_type == "code"]
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # the tutorial saves a model folder in its working directory
        try:
            for source in code:
                exec(compile(source, "quickstart_synthetic.md", "exec"), namespace)
        finally:
            os.chdir(cwd)
    st, test, genes = namespace["st"], namespace["test"], namespace["genes"]
    OUT.mkdir(parents=True, exist_ok=True)
    st.pl.gene_map(test, genes[:3], map_key="he_pixnet", dpi=110, show=False, save=OUT / "gene_map.png")
    st.pl.compare(
        test,
        genes[:2],
        tables={"PixNet": "he_pixnet_8um", "truth": "truth_8um"},
        shared_scale=False,
        dpi=110,
        show=False,
        save=OUT / "compare.png",
    )
    print(*sorted(p.relative_to(ROOT).as_posix() for p in OUT.glob("*.png")), sep="\n")


if __name__ == "__main__":
    main()
