"""The tutorials run as written: their python cells, in order, in a fresh interpreter, with checks on the results."""

from __future__ import annotations

import os
import re
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
""",
}


def _python_cells(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.DOTALL)


def test_every_tutorial_has_checks():
    assert sorted(p.stem for p in TUTORIALS.glob("*.md")) == sorted(CHECKS)


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_tutorial_runs_as_written(name, tmp_path):
    cells = _python_cells(TUTORIALS / f"{name}.md")
    assert cells
    script = tmp_path / f"{name}.py"
    script.write_text("\n\n".join([*cells, CHECKS[name]]))
    env = {**os.environ, "MPLBACKEND": "Agg"}
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900, check=False
    )
    assert done.returncode == 0, done.stderr[-4000:]
