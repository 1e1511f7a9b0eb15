from __future__ import annotations

import subprocess
import sys

import stpredict.io

HEAVY = ("torch", "timm", "spatialdata", "spatialdata_io", "dask.distributed", "lightning")


def test_import_io_is_cheap():
    code = (
        f"import sys, stpredict.io as io; io.__all__; print(','.join(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing stpredict.io imported {out.stdout.strip()}"


def test_public_names_resolve():
    assert set(stpredict.io.__all__) == {
        "from_image_and_table",
        "infer_um_per_px",
        "read_st",
        "read_visium",
        "read_visium_hd",
        "read_xenium",
        "read_wsi",
    }
    for name in stpredict.io.__all__:
        assert callable(getattr(stpredict.io, name))
    assert set(dir(stpredict.io)) == set(stpredict.io.__all__)
