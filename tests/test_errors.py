"""``st.errors``: the exceptions a pipeline catches by name are the ones the library raises."""

from __future__ import annotations

import numpy as np
import pytest
from spatialdata import SpatialData
from spatialdata.models import Image2DModel

import stpredict as st


def test_errors_namespace_holds_the_raised_classes():
    assert st.errors.__all__ == ["CalibrationError", "CoordinateSystemError", "InputError", "OutputFolderError"]
    assert issubclass(st.errors.CalibrationError, st.errors.InputError)
    assert issubclass(st.errors.CoordinateSystemError, st.errors.InputError)
    assert issubclass(st.errors.InputError, ValueError)  # code that catches ValueError keeps working
    assert issubclass(st.errors.OutputFolderError, FileExistsError)


def test_the_library_raises_the_public_classes():
    image = Image2DModel.parse(np.zeros((3, 16, 16), dtype=np.uint8), dims=("c", "y", "x"))
    sdata = SpatialData(images={"he": image})
    with pytest.raises(st.errors.CalibrationError, match="um_per_px"):
        st.pp.calibrate(sdata, "he")
    with pytest.raises(st.errors.InputError):
        st.pp.calibrate(sdata, "he", um_per_px=-1.0)
