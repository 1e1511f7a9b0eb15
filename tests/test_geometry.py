from __future__ import annotations

import numpy as np
import pytest
import spatialdata as sd
from hypothesis import given, settings
from hypothesis import strategies as st_h
from spatialdata.models import Image2DModel, Labels2DModel, ShapesModel
from spatialdata.transformations import Identity, Scale, Sequence, Translation

from stpredict import _geometry as g
from stpredict.errors import CalibrationError, CoordinateSystemError, InputError


def _sdata(labels_scale=4.0, labels_shift=(3.0, -2.0)):
    image = Image2DModel.parse(
        np.zeros((3, 40, 60), np.uint8), dims=("c", "y", "x"), transformations={"global": Identity()}
    )
    labels_t = Sequence(
        [Scale([labels_scale, labels_scale], axes=("x", "y")), Translation(list(labels_shift), axes=("x", "y"))]
    )
    labels = Labels2DModel.parse(np.zeros((10, 15), np.uint32), dims=("y", "x"), transformations={"global": labels_t})
    spots = ShapesModel.parse(
        np.array([[10.0, 20.0], [30.0, 5.0]]),
        geometry=0,
        radius=np.array([2.0, 2.0]),
        transformations={"global": Identity()},
    )
    return sd.SpatialData(images={"he": image}, labels={"cells": labels}, shapes={"spots": spots})


def test_uncalibrated_error_names_the_call():
    sdata = _sdata()
    assert not g.is_calibrated(sdata, "he")
    with pytest.raises(CalibrationError, match=r"st\.pp\.calibrate"):
        g.um_per_px(sdata, "he")


def test_calibration_reaches_every_element_in_a_shared_system():
    sdata = _sdata(labels_scale=4.0)
    g.set_um_per_px(sdata, "he", 0.5)
    assert g.um_per_px(sdata, "he") == pytest.approx(0.5)
    assert g.um_per_px(sdata, "spots") == pytest.approx(0.5)
    assert g.um_per_px(sdata, "cells") == pytest.approx(2.0)  # a label pixel spans 4 image pixels
    # labels pixel corner (0, 0) sits at image pixel (3, -2), i.e. (1.5, -1.0) µm
    np.testing.assert_allclose(g.apply_affine(g.to_um_affine(sdata, "cells"), [[0.0, 0.0]]), [[1.5, -1.0]])


def test_element_added_after_calibration_is_reached_through_a_shared_system():
    sdata = _sdata()
    g.set_um_per_px(sdata, "he", 0.25)
    sdata.shapes["late"] = ShapesModel.parse(
        np.array([[1.0, 1.0]]),
        geometry=0,
        radius=np.array([1.0]),
        transformations={"global": Scale([2, 2], axes=("x", "y"))},
    )
    assert g.um_per_px(sdata, "late") == pytest.approx(0.5)


def test_bad_values_anisotropy_and_foreign_systems():
    sdata = _sdata()
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(InputError, match="positive"):
            g.set_um_per_px(sdata, "he", bad)
    assert not g.is_calibrated(sdata, "he")  # nothing written on failure
    sdata.images["stretched"] = Image2DModel.parse(
        np.zeros((1, 4, 4), np.uint8), dims=("c", "y", "x"), transformations={"global": Scale([1, 2], axes=("x", "y"))}
    )
    g.set_um_per_px(sdata, "he", 1.0)
    with pytest.raises(CalibrationError, match="non-square"):
        g.um_per_px(sdata, "stretched")
    sdata.images["elsewhere"] = Image2DModel.parse(
        np.zeros((1, 4, 4), np.uint8), dims=("c", "y", "x"), transformations={"other": Identity()}
    )
    with pytest.raises(CoordinateSystemError, match="share no coordinate system"):
        g.affine_between(sdata, "elsewhere", "he")
    with pytest.raises(KeyError, match="available elements"):
        g.get_element(sdata, "nope")


@settings(max_examples=40, deadline=None)
@given(
    scale=st_h.floats(0.25, 8.0),
    sx=st_h.floats(-50.0, 50.0),
    sy=st_h.floats(-50.0, 50.0),
    mpp=st_h.floats(0.1, 5.0),
    xy=st_h.lists(st_h.tuples(st_h.floats(-100, 100), st_h.floats(-100, 100)), min_size=1, max_size=5),
)
def test_affine_between_composes_and_inverts(scale, sx, sy, mpp, xy):
    sdata = _sdata(labels_scale=scale, labels_shift=(sx, sy))
    g.set_um_per_px(sdata, "he", mpp)
    pts = np.array(xy)
    to_image = g.affine_between(sdata, "cells", "he")
    np.testing.assert_allclose(g.apply_affine(to_image, pts), pts * scale + [sx, sy], rtol=1e-9, atol=1e-9)
    back = g.apply_affine(g.affine_between(sdata, "he", "cells"), g.apply_affine(to_image, pts))
    np.testing.assert_allclose(back, pts, rtol=1e-9, atol=1e-7)
    # µm through the labels equals µm through the image
    np.testing.assert_allclose(
        g.apply_affine(g.to_um_affine(sdata, "cells"), pts),
        g.apply_affine(g.to_um_affine(sdata, "he"), g.apply_affine(to_image, pts)),
        rtol=1e-9,
        atol=1e-7,
    )


def test_pixel_centres_and_levels():
    xs, ys = g.pixel_centers((2, 3))
    np.testing.assert_array_equal(xs, [0.5, 1.5, 2.5])
    np.testing.assert_array_equal(ys, [0.5, 1.5])
    pyramid = Image2DModel.parse(np.zeros((3, 64, 48), np.uint8), dims=("c", "y", "x"), scale_factors=[2, 2])
    assert [lvl.shape for lvl in g.scale_levels(pyramid)] == [(3, 64, 48), (3, 32, 24), (3, 16, 12)]
    assert g.raster_shape(pyramid) == (64, 48)
