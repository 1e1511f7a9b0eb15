from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure
from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar
from spatialdata.models import Image2DModel

import stpredict as st
from stpredict.errors import CalibrationError, InputError

DPI = 50
TOL = 15  # RMS, STYLE.md: 15-25 at most


def _panels(fig):
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def _bars(ax):
    return [a for a in ax.artists if isinstance(a, AnchoredSizeBar)]


def test_gene_map_over_he_in_um_with_scale_bar(make_sdata):
    sdata, values = make_sdata()
    fig = st.pl.gene_map(sdata, ["A", "B"], dpi=DPI, show=False)  # map_key: the only dense map
    assert isinstance(fig, Figure)
    panels = _panels(fig)
    assert [ax.get_title() for ax in panels] == ["A", "B"]
    assert len(fig.axes) == 2 + 2  # one colorbar per gene
    for ax in panels:
        he_im, map_im = ax.get_images()
        # H&E: 96 × 64 px at 0.5 µm; the map: 24 × 16 pixels of 4 image pixels: the same 48 × 32 µm.
        assert he_im.get_extent() == pytest.approx([0, 48, 32, 0])
        assert map_im.get_extent() == pytest.approx([0, 48, 32, 0])
        assert map_im.get_alpha() == pytest.approx(0.6)
        assert ax.get_xlim() == pytest.approx((0, 48))
        assert ax.get_ylim() == pytest.approx((32, 0))  # y down, like the image
        (bar,) = _bars(ax)
        assert bar.length_um == 5  # the largest 1-2-5 length within a fifth of 48 µm
        assert ax.get_xticks().size == 0
    np.testing.assert_allclose(panels[1].get_images()[1].get_array(), values[1])
    a_im = panels[0].get_images()[1]
    assert (a_im.norm.vmin, a_im.norm.vmax) == pytest.approx(tuple(np.percentile(values[0], [1, 99])))
    b_im = panels[1].get_images()[1]
    assert (b_im.norm.vmin, b_im.norm.vmax) == pytest.approx(tuple(np.percentile(values[1], [1, 99])))
    fig.canvas.draw()


def test_gene_map_shared_scale_and_minmax(make_sdata):
    sdata, values = make_sdata()
    fig = st.pl.gene_map(sdata, ["A", "B"], shared_scale=True, robust=False, dpi=DPI, show=False)
    assert len(fig.axes) == 2 + 1  # one colorbar for both genes
    norms = [ax.get_images()[1].norm for ax in _panels(fig)]
    expected = (values[:2].min(), values[:2].max())
    assert [(n.vmin, n.vmax) for n in norms] == [pytest.approx(expected)] * 2


def test_gene_map_roi_crops_in_um(make_sdata):
    sdata, values = make_sdata()
    fig = st.pl.gene_map(sdata, "B", roi_um=(10, 6, 30, 20), dpi=DPI, show=False)
    (ax,) = _panels(fig)
    he_im, map_im = ax.get_images()
    # the map has 2 µm pixels: x 10-30 µm is map columns 5-15, y 6-20 µm is rows 3-10
    np.testing.assert_allclose(map_im.get_array(), values[1, 3:10, 5:15])
    assert map_im.get_extent() == pytest.approx([10, 30, 20, 6])
    assert he_im.get_array().shape[:2] == (28, 40)  # 0.5 µm pixels
    assert he_im.get_extent() == pytest.approx([10, 30, 20, 6])
    assert ax.get_xlim() == pytest.approx((10, 30))
    assert ax.get_ylim() == pytest.approx((20, 6))
    assert _bars(ax)[0].length_um == 2
    # a window between map pixels draws the pixels it meets, and shows exactly the window
    fig = st.pl.gene_map(sdata, "B", roi_um=(9, 5, 31, 21), dpi=DPI, show=False)
    (ax,) = _panels(fig)
    assert ax.get_images()[1].get_extent() == pytest.approx([8, 32, 22, 4])
    np.testing.assert_allclose(ax.get_images()[1].get_array(), values[1, 2:11, 4:16])
    assert ax.get_xlim() == pytest.approx((9, 31))


def test_gene_map_pyramid_level_for_the_view(make_sdata):
    sdata, _ = make_sdata(multiscale=True)
    fig = st.pl.gene_map(sdata, "C", max_pixels=48, dpi=DPI, show=False)
    he_im, _ = _panels(fig)[0].get_images()
    assert he_im.get_array().shape[:2] == (32, 48)  # the coarser pyramid level was drawn...
    assert he_im.get_extent() == pytest.approx([0, 48, 32, 0])  # ...over the full extent
    fig = st.pl.gene_map(sdata, "C", max_pixels=48, roi_um=(0, 0, 20, 20), dpi=DPI, show=False)
    he_im, _ = _panels(fig)[0].get_images()
    assert he_im.get_array().shape[:2] == (40, 40)  # zoomed in: full resolution fits


def test_gene_map_whole_slide_never_reads_full_resolution(whole_slide):
    sdata, he_log, map_log = whole_slide()
    fig = st.pl.gene_map(sdata, ["g1", "g7"], dpi=DPI, show=False)  # level 0 raises if read
    fig.canvas.draw()
    # 2 × 3 in × 50 dpi = 300 px: the H&E at 1/128 (312 px... too big) -> 1/128 is level 7 (312 > 300) -> coarsest
    assert set(he_log.reads) == {7}
    assert set(map_log.reads) == {5}  # 5000 / 32 = 156 px
    (ax, _) = _panels(fig)
    assert ax.get_images()[1].get_extent() == pytest.approx([0, 20000, 20000, 0])
    assert _bars(ax)[0].length_um == 2000
    assert _bars(ax)[0].txt_label.get_text() == "2 mm"


def test_gene_map_zoom_reads_only_the_chunks_it_shows(whole_slide):
    sdata, he_log, map_log = whole_slide(forbid_full_resolution=False)
    fig = st.pl.gene_map(sdata, "g3", roi_um=(100, 100, 200, 180), dpi=DPI, show=False)
    assert he_log.reads == {0: 1}  # 200 × 160 px at full resolution, inside one 4096² chunk
    assert map_log.reads == {0: 1}
    (ax,) = _panels(fig)
    assert ax.get_images()[0].get_array().shape[:2] == (160, 200)
    assert ax.get_images()[1].get_extent() == pytest.approx([100, 200, 180, 100])


def test_gene_map_image_panel_axes_and_pixels(make_sdata):
    sdata, values = make_sdata(calibrate=False, offset=2.0)
    fig = Figure(dpi=DPI)
    grid = fig.subplots(2, 3)
    returned = st.pl.gene_map(sdata, ["A", "B"], overlay=False, ax=grid[1], show=False)
    assert returned is fig
    assert [ax.get_title() for ax in grid[1]] == ["he", "A", "B"]
    assert [ax.get_title() for ax in grid[0]] == ["", "", ""]  # the other row is left alone
    # uncalibrated: the image's pixels; Scale(4) then Translation(2) puts map corner (0, 0) at pixel (2, 2)
    assert grid[1][1].get_images()[0].get_extent() == pytest.approx([2, 98, 66, 2])
    assert grid[1][0].get_images()[0].get_extent() == pytest.approx([0, 96, 64, 0])
    assert grid[1][1].get_xlabel() == "x (px)"
    assert not _bars(grid[1][1])
    np.testing.assert_allclose(grid[1][2].get_images()[0].get_array(), values[1])
    with pytest.raises(InputError, match="Pass 3 axes"):
        st.pl.gene_map(sdata, ["A", "B"], overlay=False, ax=grid[0][:2], show=False)
    with pytest.raises(CalibrationError, match="calibrate"):
        st.pl.gene_map(sdata, "A", roi_um=(0, 0, 10, 10), show=False)
    fig = st.pl.gene_map(sdata, ["A", "B", "C"], image_key=None, overlay=False, ncols=2, dpi=DPI, show=False)
    panels = _panels(fig)
    assert [a.get_title() for a in panels] == ["A", "B", "C"]
    assert panels[0].get_images()[0].get_extent() == pytest.approx([0, 24, 16, 0])  # the map's own pixels


def test_gene_map_chooses_the_map_or_says_which(make_sdata):
    sdata, _ = make_sdata()
    sdata.images["he_magnet"] = Image2DModel.parse(np.zeros((1, 4, 4), np.float32), dims=("c", "y", "x"))
    with pytest.raises(InputError, match=r"several dense maps \['he_magnet', 'he_pixnet'\]; choose one with `map_key="):
        st.pl.gene_map(sdata, "A", show=False)
    assert _panels(st.pl.gene_map(sdata, "A", map_key="he_pixnet", dpi=DPI, show=False))[0].get_title() == "A"
    del sdata.images["he_magnet"]
    del sdata.images["he_pixnet"]
    with pytest.raises(InputError, match="predict_dense"):
        st.pl.gene_map(sdata, "A", show=False)


def test_gene_map_errors(make_sdata):
    sdata, _ = make_sdata()
    with pytest.raises(KeyError, match="not channels"):
        st.pl.gene_map(sdata, ["ZZZ"], show=False)
    with pytest.raises(KeyError, match="No dense map"):
        st.pl.gene_map(sdata, ["A"], map_key="nope", show=False)
    with pytest.raises(InputError, match="overlay"):
        st.pl.gene_map(sdata, ["A"], image_key=None, show=False)
    with pytest.raises(InputError, match="x1 > x0"):
        st.pl.gene_map(sdata, ["A"], roi_um=(10, 0, 5, 5), show=False)
    with pytest.raises(InputError, match="does not meet"):
        st.pl.gene_map(sdata, ["A"], roi_um=(100, 100, 120, 120), show=False)
    with pytest.raises(InputError, match="at least one gene"):
        st.pl.gene_map(sdata, [], show=False)


@pytest.mark.mpl_image_compare(baseline_dir="baseline", tolerance=TOL, style="default")
def test_image_gene_map(make_sdata):
    sdata, _ = make_sdata()
    return st.pl.gene_map(sdata, ["A", "B"], panel_size=2.0, dpi=DPI, show=False)


@pytest.mark.mpl_image_compare(baseline_dir="baseline", tolerance=TOL, style="default")
def test_image_gene_map_roi_side_by_side(make_sdata):
    sdata, _ = make_sdata()
    return st.pl.gene_map(
        sdata, ["B", "C"], roi_um=(8, 4, 40, 28), overlay=False, shared_scale=True, panel_size=2.0, dpi=DPI, show=False
    )


def test_gene_map_hides_the_map_off_the_tissue_mask(make_sdata):
    from spatialdata.models import Labels2DModel
    from spatialdata.transformations import get_transformation

    sdata, values = make_sdata()
    # tissue: the left 20 of the image's 96 columns (10 µm at 0.5 µm/px), labels on the image's pixel grid
    tissue = np.zeros((64, 96), dtype=np.uint8)
    tissue[:, :20] = 1
    sdata.labels["he_tissue"] = Labels2DModel.parse(
        tissue, dims=("y", "x"), transformations=get_transformation(sdata.images["he"], get_all=True)
    )
    fig = st.pl.gene_map(sdata, ["A"], dpi=DPI, show=False)  # tissue_key="auto" finds he_tissue
    drawn = np.ma.filled(_panels(fig)[0].get_images()[1].get_array().astype(np.float64), np.nan)
    # map pixels are 2 µm wide: centres at 1, 3, ..., so columns 0-4 (centres < 10 µm) are on tissue
    expected = np.full_like(values[0], np.nan, dtype=np.float64)
    expected[:, :5] = values[0][:, :5]
    np.testing.assert_array_equal(np.isnan(drawn), np.isnan(expected))
    np.testing.assert_allclose(drawn[:, :5], values[0][:, :5])
    # colour limits come from what is drawn, the tissue
    vmin, vmax = np.percentile(values[0][:, :5], [1, 99])
    assert (fig.axes[0].get_images()[1].norm.vmin, fig.axes[0].get_images()[1].norm.vmax) == pytest.approx((vmin, vmax))

    everywhere = st.pl.gene_map(sdata, ["A"], tissue_key=None, dpi=DPI, show=False)
    assert np.isfinite(np.ma.filled(_panels(everywhere)[0].get_images()[1].get_array(), np.nan)).all()
    with pytest.raises(KeyError, match=r"st\.pp\.tissue_mask.*tissue_key=None"):
        st.pl.gene_map(sdata, ["A"], tissue_key="cells", show=False)
