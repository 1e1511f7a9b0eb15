from __future__ import annotations

import subprocess
import sys

import anndata as ad
import matplotlib as mpl
import numpy as np
import pandas as pd
import pytest
import spatialdata as sd
from matplotlib.figure import Figure
from spatialdata.models import Image2DModel
from spatialdata.transformations import Scale, Sequence, Translation

import stpredict as st
from stpredict._errors import CalibrationError, InputError
from stpredict._geometry import set_um_per_px

mpl.use("Agg")
DPI = 40


def _sdata(*, calibrate=True, multiscale=False, offset=0.0):
    rng = np.random.default_rng(0)
    he = Image2DModel.parse(
        rng.integers(0, 255, size=(3, 64, 96), dtype=np.uint8),
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        scale_factors=[2] if multiscale else None,
    )
    stride = Scale([4.0, 4.0], axes=("x", "y"))
    t = stride if offset == 0 else Sequence([stride, Translation([offset, offset], axes=("x", "y"))])
    values = rng.random((3, 16, 24)).astype(np.float32)
    values[1] = np.arange(24, dtype=np.float32)[None, :]  # gene B increases along x
    dense = Image2DModel.parse(values, dims=("c", "y", "x"), c_coords=["A", "B", "C"], transformations={"global": t})
    sdata = sd.SpatialData(images={"he": he, "he_pixnet": dense})
    if calibrate:
        set_um_per_px(sdata, "he", 0.5)
    return sdata, values


def _image_artists(ax):
    return ax.get_images()


def test_dense_maps_side_by_side_in_um():
    sdata, values = _sdata()
    fig = st.pl.dense_maps(sdata, "he_pixnet", genes=["A", "B"], dpi=DPI, show=False)
    assert isinstance(fig, Figure)
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert [ax.get_title() for ax in panels] == ["he", "A", "B"]
    assert len(fig.axes) == 3 + 2  # two colorbars
    he_im, a_im = _image_artists(panels[0])[0], _image_artists(panels[1])[0]
    # H&E: 96 × 64 px at 0.5 µm; the map: 24 × 16 pixels of 4 image pixels: the same 48 × 32 µm.
    assert he_im.get_extent() == pytest.approx([0, 48, 32, 0])
    assert a_im.get_extent() == pytest.approx([0, 48, 32, 0])
    np.testing.assert_allclose(_image_artists(panels[2])[0].get_array(), values[1])
    assert panels[1].get_xlabel() == "x (µm)"
    assert panels[1].get_xlim() == pytest.approx((0, 48))
    fig.canvas.draw()  # renders with Agg


def test_dense_maps_into_given_axes_of_a_larger_grid():
    sdata, values = _sdata()
    fig = Figure()
    grid = fig.subplots(2, 3)
    returned = st.pl.dense_maps(sdata, "he_pixnet", genes=["A", "B"], axes=grid[1], show=False)
    assert returned is fig
    assert [ax.get_title() for ax in grid[1]] == ["he", "A", "B"]
    assert [ax.get_title() for ax in grid[0]] == ["", "", ""]  # the other row is left alone
    np.testing.assert_allclose(_image_artists(grid[1][2])[0].get_array(), values[1])
    with pytest.raises(InputError, match="Pass 3 axes"):
        st.pl.dense_maps(sdata, "he_pixnet", genes=["A", "B"], axes=grid[0][:2], show=False)


def test_dense_maps_pixels_overlay_offset_and_pyramid():
    sdata, _ = _sdata(calibrate=False, multiscale=True, offset=2.0)
    fig = st.pl.dense_maps(sdata, "he_pixnet", genes="C", overlay=True, dpi=DPI, max_pixels=48, show=False)
    (ax,) = [a for a in fig.axes if a.get_label() != "<colorbar>"]
    he_im, map_im = _image_artists(ax)
    assert he_im.get_array().shape[:2] == (32, 48)  # the coarser pyramid level was drawn
    assert he_im.get_extent() == pytest.approx([0, 96, 64, 0])  # ...over the full-resolution extent
    # Scale(4) then Translation(2): map pixel corner (0, 0) sits at image pixel (2, 2).
    assert map_im.get_extent() == pytest.approx([2, 98, 66, 2])
    assert map_im.get_alpha() == pytest.approx(0.6)
    assert ax.get_xlabel() == "x (px)"
    with pytest.raises(CalibrationError, match="calibrate"):
        st.pl.dense_maps(sdata, "he_pixnet", genes="C", units="um", show=False)
    fig = st.pl.dense_maps(sdata, "he_pixnet", genes=["A", "B", "C"], image_key=None, ncols=2, dpi=DPI, show=False)
    panels = [a for a in fig.axes if a.get_label() != "<colorbar>"]
    assert [a.get_title() for a in panels] == ["A", "B", "C"]
    assert panels[0].get_images()[0].get_extent() == pytest.approx([0, 24, 16, 0])  # own pixels


def test_dense_maps_errors():
    sdata, _ = _sdata()
    with pytest.raises(KeyError, match="not channels"):
        st.pl.dense_maps(sdata, "he_pixnet", genes=["ZZZ"], show=False)
    with pytest.raises(KeyError, match="No dense map"):
        st.pl.dense_maps(sdata, "nope", genes=["A"], show=False)
    with pytest.raises(InputError, match="overlay"):
        st.pl.dense_maps(sdata, "he_pixnet", genes=["A"], image_key=None, overlay=True, show=False)


def _tables(rng, n=80, g=6):
    rows, cols = np.divmod(np.arange(n), 10)
    y = rng.normal(size=(n, g))
    y_hat = 0.6 * y + rng.normal(scale=0.5, size=y.shape)
    y_hat[:, 0] = 1.0  # a constant prediction: undefined PCC
    obs = pd.DataFrame({"instance_id": np.arange(n), "array_row": rows, "array_col": cols})
    obs.index = obs.index.astype(str)
    var = pd.DataFrame(index=[f"g{j}" for j in range(g)])
    return ad.AnnData(y_hat, obs=obs, var=var), ad.AnnData(y, obs=obs.copy(), var=var.copy())


def test_predicted_vs_measured(rng):
    pred, truth = _tables(rng)
    ax = st.pl.predicted_vs_measured(pred, truth, gene="g2", dpi=DPI, show=False)
    offsets = ax.collections[0].get_offsets()
    np.testing.assert_allclose(offsets[:, 0], truth.X[:, 2])
    np.testing.assert_allclose(offsets[:, 1], pred.X[:, 2])
    r = np.corrcoef(truth.X[:, 2], pred.X[:, 2])[0, 1]
    assert ax.get_title() == f"g2: PCC = {r:.3f} (n = 80)"
    assert "nan" in st.pl.predicted_vs_measured(pred, truth, gene="g0", show=False).get_title()
    _, ax2 = Figure(dpi=DPI).subplots(1, 2)
    assert st.pl.predicted_vs_measured(pred[::-1].copy(), truth, gene="g3", ax=ax2, show=False) is ax2  # matched by id
    np.testing.assert_allclose(ax2.collections[0].get_offsets()[:, 1], pred.X[::-1, 3])
    with pytest.raises(KeyError, match="not in the prediction"):
        st.pl.predicted_vs_measured(pred, truth, gene="nope", show=False)


def test_gene_scores_histogram_marks_f_s_m(rng):
    pred, truth = _tables(rng)
    result = st.tl.evaluate(pred, truth)
    ax = st.pl.gene_scores(result, dpi=DPI, show=False)
    lines = {line.get_label().split(" =")[0]: line.get_xdata()[0] for line in ax.get_lines()}
    assert lines["PCC@F"] == pytest.approx(result.summary["pcc_f"])
    assert lines["PCC@S"] == pytest.approx(result.summary["pcc_s"])
    assert lines["PCC@M"] == pytest.approx(result.summary["pcc_m"])
    assert sum(p.get_height() for p in ax.patches) == 6  # every gene counted, the undefined one as −1
    assert "1 undefined as −1" in ax.get_title()
    ax = st.pl.gene_scores(result.per_gene, nan_policy="omit", dpi=DPI, show=False)
    assert sum(p.get_height() for p in ax.patches) == 5
    with pytest.raises(KeyError, match="per-gene column"):
        st.pl.gene_scores(result, metric="nope", show=False)


def test_scale_curve():
    table = pd.DataFrame(
        {
            "bin_size_um": [8, 16, 55] * 2 + [8, 16, 55] * 2,
            "metric": ["pcc_m"] * 3 + ["spot_pcc"] * 3 + ["pcc_m"] * 3 + ["spot_pcc"] * 3,
            "value": [0.2, 0.25, 0.3, 0.5, 0.6, 0.7, 0.1, 0.15, 0.2, 0.4, 0.45, 0.5],
            "model": ["pixnet"] * 6 + ["ridge"] * 6,
        }
    )
    ax = st.pl.scale_curve(table[table.model == "pixnet"], dpi=DPI, show=False)
    (line,) = ax.get_lines()
    np.testing.assert_allclose(line.get_xdata(), [8, 16, 55])
    np.testing.assert_allclose(line.get_ydata(), [0.2, 0.25, 0.3])
    assert line.get_label() == "PCC@M"
    assert ax.get_xlabel() == "bin size (µm)"
    ax = st.pl.scale_curve(table, metrics=["pcc_m", "spot_pcc"], hue="model", logx=True, dpi=DPI, show=False)
    assert [ln.get_label() for ln in ax.get_lines()] == [
        "pixnet PCC@M",
        "pixnet spot-wise PCC (MagNet)",
        "ridge PCC@M",
        "ridge spot-wise PCC (MagNet)",
    ]
    assert "not comparable" in ax.get_title()
    assert ax.get_xscale() == "log"
    with pytest.raises(KeyError, match="not in the table"):
        st.pl.scale_curve(table, metrics="ssim_m", show=False)


def test_import_pl_does_not_import_matplotlib():
    code = "import sys, stpredict.pl; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_show_and_save_follow_scanpy(tmp_path, monkeypatch, rng):
    import matplotlib.pyplot as plt

    shown = []
    monkeypatch.setattr(plt, "show", lambda *args, **kwargs: shown.append(plt.get_fignums()))
    sdata, _ = _sdata()
    assert st.pl.dense_maps(sdata, "he_pixnet", genes="A", dpi=DPI) is None  # shown by default, nothing returned
    assert len(shown) == 1
    assert len(shown[0]) == 1
    plt.close("all")
    path = tmp_path / "figures" / "map.png"
    fig = st.pl.dense_maps(sdata, "he_pixnet", genes="A", dpi=DPI, save=path)
    assert isinstance(fig, Figure)
    assert len(shown) == 1  # a saved figure is not shown unless asked
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pred, truth = _tables(rng)
    pdf = tmp_path / "scatter.pdf"
    assert st.pl.predicted_vs_measured(pred, truth, gene="g2", save=pdf, show=True) is None
    assert len(shown) == 2
    assert pdf.read_bytes()[:5] == b"%PDF-"
    _, ax = plt.subplots()
    assert st.pl.predicted_vs_measured(pred, truth, gene="g2", ax=ax) is ax  # into the caller's axes: not shown
    assert len(shown) == 2
    with pytest.raises(InputError, match="suffix"):
        st.pl.dense_maps(sdata, "he_pixnet", genes="A", save=tmp_path / "map")
    plt.close("all")
