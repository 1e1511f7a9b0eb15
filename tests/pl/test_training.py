from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure

import stpredict as st
from stpredict.errors import InputError

DPI = 50
TOL = 15  # RMS, STYLE.md: 15-25 at most

#: What PixNet.fit / MagNet.fit store (models/_training/_fit.py, models/_magnet/_fit.py).
HISTORY = {"train_loss": [1.2, 0.8, 0.6, 0.55, 0.5], "val_loss": [1.3, 0.9, 0.7, 0.72, 0.75], "best_epoch": 2}


class _Fitted:
    """Stands in for a fitted model: only ``fit_history`` is read."""

    def __init__(self, history):
        self.fit_history = history


def test_training_curves_from_a_model():
    ax = st.pl.training_curves(_Fitted(HISTORY), dpi=DPI, show=False)
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines) == ["training loss", "validation loss", "best epoch = 2"]
    np.testing.assert_allclose(lines["training loss"].get_xdata(), np.arange(5))  # epochs from 0, like best_epoch
    np.testing.assert_allclose(lines["validation loss"].get_ydata(), HISTORY["val_loss"])
    np.testing.assert_allclose(lines["best epoch = 2"].get_xdata(), [2, 2])
    assert lines["validation loss"].get_ydata()[2] == min(HISTORY["val_loss"])
    assert ax.get_xlabel() == "epoch"
    assert ax.get_yscale() == "linear"


def test_training_curves_without_validation_metrics_and_log():
    history = {"train_loss": [2.0, 1.0, 0.5], "val_loss": [], "best_epoch": 2}  # no validation data
    fig = Figure(dpi=DPI)
    ax = fig.subplots()
    assert st.pl.training_curves(history, logy=True, ax=ax, show=False) is ax
    assert [line.get_label() for line in ax.get_lines()] == ["training loss", "best epoch = 2"]
    assert ax.get_yscale() == "log"
    ax = st.pl.training_curves(HISTORY, metrics="val_loss", dpi=DPI, show=False)
    assert [line.get_label() for line in ax.get_lines()] == ["validation loss", "best epoch = 2"]


def test_training_curves_errors():
    with pytest.raises(InputError, match=r"train it first with `model.fit"):
        st.pl.training_curves(_Fitted(None), show=False)
    with pytest.raises(InputError, match="fitted model"):
        st.pl.training_curves([0.1, 0.2], show=False)
    with pytest.raises(KeyError, match=r"No per-epoch values for \['loss'\]"):
        st.pl.training_curves(HISTORY, metrics="loss", show=False)
    with pytest.raises(InputError, match="no per-epoch values"):
        st.pl.training_curves({"best_epoch": -1, "train_loss": []}, show=False)
    with pytest.raises(InputError, match="logy=True needs positive"):
        st.pl.training_curves({"train_loss": [0.5, -0.1]}, logy=True, show=False)


@pytest.mark.mpl_image_compare(baseline_dir="baseline", tolerance=TOL, style="default")
def test_image_training_curves():
    return st.pl.training_curves(_Fitted(HISTORY), figsize=(3.0, 2.5), dpi=DPI, show=False).figure
