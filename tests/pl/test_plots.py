from __future__ import annotations

import subprocess
import sys

import anndata as ad
import matplotlib as mpl
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

import stpredict as st
from stpredict.errors import InputError

mpl.use("Agg")
DPI = 50
TOL = 15  # RMS, STYLE.md: 15-25 at most


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
    ax = st.pl.gene_scores(result, kind="hist", dpi=DPI, show=False)
    lines = {line.get_label().split(" =")[0]: line.get_xdata()[0] for line in ax.get_lines()}
    assert lines["PCC@F"] == pytest.approx(result.summary["pcc_f"])
    assert lines["PCC@S"] == pytest.approx(result.summary["pcc_s"])
    assert lines["PCC@M"] == pytest.approx(result.summary["pcc_m"])
    assert sum(p.get_height() for p in ax.patches) == 6  # every gene counted, the undefined one as −1
    assert "1 undefined as −1" in ax.get_title()
    ax = st.pl.gene_scores(result.per_gene, kind="hist", nan_policy="omit", dpi=DPI, show=False)
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


def _two_models(rng):
    pred, truth = _tables(rng)
    worse = pred.copy()
    worse.X = worse.X + rng.normal(scale=2.0, size=worse.shape)
    return {"pixnet": st.tl.evaluate(pred, truth), "ridge": st.tl.evaluate(worse, truth)}


def test_gene_scores_several_models_box_hist_rank(rng):
    results = _two_models(rng)
    pcc = {k: np.nan_to_num(r.per_gene["pcc"].to_numpy(), nan=-1.0) for k, r in results.items()}
    ax = st.pl.gene_scores(results, dpi=DPI, show=False)  # box by default
    assert [t.get_text() for t in ax.get_xticklabels()] == ["pixnet", "ridge"]
    by_gid = {line.get_gid(): line.get_ydata()[0] for line in ax.get_lines() if line.get_gid()}
    assert by_gid["median pixnet"] == pytest.approx(np.median(pcc["pixnet"]))
    assert by_gid["median ridge"] == pytest.approx(np.median(pcc["ridge"]))
    means = [by_gid["mean pixnet"], by_gid["mean ridge"]]
    assert means == pytest.approx([pcc["pixnet"].mean(), pcc["ridge"].mean()])  # PCC@M of each model
    assert means[0] == pytest.approx(results["pixnet"].summary["pcc_m"])
    assert ax.get_title() == "gene-wise PCC (6 genes)\nundefined as −1: pixnet 1"  # its constant gene
    ax = st.pl.gene_scores(results, kind="rank", dpi=DPI, show=False)
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines) == ["pixnet", "ridge"]
    np.testing.assert_allclose(lines["ridge"].get_ydata(), np.sort(pcc["ridge"])[::-1])  # best first
    np.testing.assert_allclose(lines["ridge"].get_xdata(), np.arange(1, 7))
    ax = st.pl.gene_scores(results, metric="mse", kind="rank", dpi=DPI, show=False)
    mse = results["pixnet"].per_gene["mse"].to_numpy()
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), np.sort(mse))  # lowest error first
    ax = st.pl.gene_scores(results, kind="hist", nan_policy="omit", bins=5, dpi=DPI, show=False)
    handles, labels = ax.get_legend_handles_labels()
    assert labels == ["pixnet", "ridge"]
    raw = {k: r.per_gene["pcc"].to_numpy() for k, r in results.items()}
    kept = {k: v[np.isfinite(v)] for k, v in raw.items()}  # the undefined gene is left out with "omit"
    edges = np.histogram_bin_edges(np.concatenate(list(kept.values())), bins=5)
    for patch, name in zip(ax.patches, ["pixnet", "ridge"], strict=True):  # one outline per model, shared bins
        counts = np.histogram(kept[name], bins=edges)[0]
        outline = patch.get_xy()
        np.testing.assert_allclose(np.unique(outline[:, 0]), edges)
        assert outline[:, 1].max() == counts.max()
    with pytest.raises(InputError, match="kind must be"):
        st.pl.gene_scores(results, kind="violin", show=False)
    with pytest.raises(KeyError, match="in result 'ridge'"):
        st.pl.gene_scores({"pixnet": results["pixnet"].per_gene, "ridge": results["ridge"].per_gene[["mse"]]})
    with pytest.raises(InputError, match="EvaluationResult or its per_gene"):
        st.pl.gene_scores({"x": [0.1, 0.2]}, show=False)


def test_scale_curve_models_from_a_mapping_and_duplicates():
    pixnet = pd.DataFrame({"bin_size_um": [8, 16, 55], "metric": "pcc_m", "value": [0.2, 0.3, 0.5]})
    ridge = pd.DataFrame({"bin_size_um": [16, 8, 55], "metric": "pcc_m", "value": [0.2, 0.1, 0.4]})
    ax = st.pl.scale_curve({"PixNet": pixnet, "ridge": ridge}, dpi=DPI, show=False)
    lines = ax.get_lines()
    assert [ln.get_label() for ln in lines] == ["PixNet PCC@M", "ridge PCC@M"]
    np.testing.assert_allclose(lines[1].get_xdata(), [8, 16, 55])
    np.testing.assert_allclose(lines[1].get_ydata(), [0.1, 0.2, 0.4])
    assert lines[0].get_color() != lines[1].get_color()
    both = pd.concat([pixnet, ridge])
    with pytest.raises(InputError, match="hue="):
        st.pl.scale_curve(both, show=False)


@pytest.mark.mpl_image_compare(baseline_dir="baseline", tolerance=TOL, style="default")
def test_image_gene_scores_box(rng):
    return st.pl.gene_scores(_two_models(rng), figsize=(3.0, 2.5), dpi=DPI, show=False).figure


@pytest.mark.mpl_image_compare(baseline_dir="baseline", tolerance=TOL, style="default")
def test_image_scale_curve_two_models():
    rows = [
        {"model": m, "bin_size_um": b, "metric": k, "value": v + (0.1 if k == "pcc_s" else 0.0)}
        for m, base in (("PixNet", 0.3), ("MagNet", 0.2))
        for k in ("pcc_m", "pcc_s")
        for b, v in ((8, base), (16, base + 0.1), (55, base + 0.25))
    ]
    table = pd.DataFrame(rows)
    ax = st.pl.scale_curve(table, metrics=["pcc_m", "pcc_s"], hue="model", figsize=(3.5, 2.5), dpi=DPI, show=False)
    return ax.figure


def test_import_pl_does_not_import_matplotlib():
    code = "import sys, stpredict.pl; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_show_and_save_follow_scanpy(tmp_path, monkeypatch, rng, make_sdata):
    import matplotlib.pyplot as plt

    shown = []
    monkeypatch.setattr(plt, "show", lambda *args, **kwargs: shown.append(plt.get_fignums()))
    sdata, _ = make_sdata()
    assert st.pl.gene_map(sdata, "A", dpi=DPI) is None  # shown by default, nothing returned
    assert len(shown) == 1
    assert len(shown[0]) == 1
    plt.close("all")
    path = tmp_path / "figures" / "map.png"
    fig = st.pl.gene_map(sdata, "A", dpi=DPI, save=path)
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
        st.pl.gene_map(sdata, "A", save=tmp_path / "map")
    plt.close("all")
