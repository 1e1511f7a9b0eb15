from __future__ import annotations

import subprocess
import sys

import stpredict as st

HEAVY = ("torch", "timm", "squidpy", "dask.distributed", "distributed", "lightning", "dask_image")


def test_import_is_cheap():
    code = (
        f"import sys, stpredict as st; st.settings; print(','.join(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing stpredict imported {out.stdout.strip()}"


def test_public_submodules_resolve():
    for name in ("pp", "tl", "pl", "io", "datasets", "models"):
        module = getattr(st, name)
        assert module.__name__ == f"stpredict.{name}"
        for attr in module.__all__:
            assert hasattr(module, attr), f"st.{name}.{attr} is listed in __all__ but missing"
    assert st.settings.um_coordinate_system == "um"
    assert set(dir(st)) >= {"pp", "tl", "pl", "io", "datasets", "models", "settings"}
