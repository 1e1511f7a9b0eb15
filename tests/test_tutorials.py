"""The tutorials run as written: their python cells, in order, in a fresh interpreter, with checks on the results."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).parents[1] / "tutorials"

#: Checks appended to each tutorial's cells: what the tutorial shows must hold (scores far above the 0 of a map
#: that is not aligned with the tissue, and the elements the text says are written).
CHECKS = {
    "quickstart_synthetic": """
assert result.summary["pcc_m"] > 0.25, result.summary
pcc_8um = scales.query("bin_size_um == 8 and metric == 'pcc_m'")["value"].item()
assert pcc_8um > 0.2, scales
assert "he_pixnet_8um" in test.tables and "he_pixnet_8um_bins" in test.shapes
assert st.models.load("pixnet_quickstart").var_names == list(genes)
assert "truth_8um" in test.tables
assert len(ax.get_images()) == 2 and ax.get_xlim()[1] > 1000  # H&E and the map, in µm (1600 µm section)
""",
    "visium_hd_bins": """
assert {"he_pixnet_2um", "he_pixnet_8um", "he_pixnet_16um", "he_magnet_8um", "he_magnet_16um"} <= set(test.tables)
assert scores.query("model == 'pixnet' and bin_size_um == 8")["pcc_m"].item() > 0.15
assert len(svg) == 8 and moran.notna().all().all()
""",
    "her2st": """
assert result.summary["mse"] < 1.0 and result.summary["pcc_s"] > 0.0
assert "he_pixnet_spots" in test.tables and len(genes) == 30
""",
    "scale_out": """
import numpy as np
assert np.abs(distributed_map - local_map).max() < 1e-4 and len(timings) == 3
""",
    "bring_your_own_slide": """
assert abs(st.pp.calibrate(scan, "he") - 0.5) < 1e-9 and st.pp.calibrate(bare, "he") == 0.5
assert xenium_crop.tables["table"].shape == (200, 338) and abs(pitch_um_per_px - 0.7268) < 0.005
""",
}
#: Tutorials that read the small real datasets (skipped where ../shared/data is absent).
NEEDS_DATA = {"her2st", "bring_your_own_slide"}


def _python_cells(path: Path) -> list[str]:
    """The notebook's code cells (``{code-cell}``); plain ```python fences are examples that are not run."""
    import jupytext

    return [c.source for c in jupytext.read(path).cells if c.cell_type == "code"]


def test_every_tutorial_has_checks():
    assert sorted(p.stem for p in TUTORIALS.glob("*.md")) == sorted(CHECKS)


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_tutorial_runs_as_written(name, tmp_path):
    data = Path(os.environ.get("STPREDICT_DATA_DIR", TUTORIALS.parents[1] / "shared" / "data"))
    if name in NEEDS_DATA and not data.is_dir():
        pytest.skip(f"the tutorial reads the real data in {data}, which is absent")
    cells = _python_cells(TUTORIALS / f"{name}.md")
    assert cells
    script = tmp_path / f"{name}.py"
    script.write_text("\n\n".join([*cells, CHECKS[name]]))
    env = {**os.environ, "MPLBACKEND": "Agg"}
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900, check=False
    )
    assert done.returncode == 0, done.stderr[-4000:]
