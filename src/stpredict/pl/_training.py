"""Training and validation loss per epoch, from a fitted model's ``fit_history``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from stpredict._errors import InputError

from ._utils import axes_or_new, finish, resolve_show

if TYPE_CHECKING:
    import os
    from collections.abc import Mapping, Sequence

    from matplotlib.axes import Axes

__all__ = ["training_curves"]

_LABELS = {"train_loss": "training loss", "val_loss": "validation loss"}


def _history(model_or_history: Any) -> Mapping[str, Any]:
    from collections.abc import Mapping

    history = model_or_history if isinstance(model_or_history, Mapping) else None
    if history is None and hasattr(model_or_history, "fit_history"):
        history = model_or_history.fit_history
        if not history:
            msg = f"{type(model_or_history).__name__} has no fit_history: train it first with `model.fit(...)`."
            raise InputError(msg)
    if history is None:
        kind = type(model_or_history).__name__
        msg = f"Pass a fitted model (with `fit_history`) or its `fit_history` dict, got {kind}."
        raise InputError(msg)
    return history


def _curves(history: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The per-epoch series of a history: non-empty lists of numbers."""
    curves = {}
    for key, value in history.items():
        if isinstance(value, list | tuple | np.ndarray) and len(value):
            array = np.asarray(value, dtype=np.float64)
            if array.ndim == 1:
                curves[str(key)] = array
    return curves


def training_curves(
    model_or_history: Any,
    *,
    metrics: str | Sequence[str] | None = None,
    logy: bool = False,
    ax: Axes | None = None,
    figsize: tuple[float, float] = (5.0, 3.5),
    dpi: float | None = None,
    show: bool | None = None,
    save: str | os.PathLike[str] | None = None,
) -> Axes | None:
    """Loss (and validation loss) per epoch of a trained model, with the epoch whose weights were kept marked.

    Parameters
    ----------
    model_or_history
        A fitted model (:class:`stpredict.models.PixNet`, :class:`stpredict.models.MagNet`, ...) or its
        ``fit_history``: ``{"train_loss": [...], "val_loss": [...], "best_epoch": int}``, one value per epoch
        (``val_loss`` is empty without validation data).
    metrics
        History keys to draw (default: every per-epoch series, e.g. ``train_loss`` and ``val_loss``).
    logy
        Logarithmic y axis (the values must be positive).
    ax
        Axes to draw into (default: a new figure).
    figsize, dpi
        Size of a new figure.
    show
        Show the figure through pyplot and return ``None``; default: show unless ``save`` or axes are given.
    save
        Write the figure to this path (the format follows the suffix: ``.png``, ``.pdf``, ``.svg``, ...).

    Returns
    -------
    The axes: one line per series (x = epoch, counted from 0 like ``best_epoch``), labelled ``"training loss"``,
    ``"validation loss"`` or the key; a dashed vertical line at ``best_epoch`` labelled ``"best epoch = k"``.

    Examples
    --------
    >>> import stpredict as st
    >>> history = {"train_loss": [1.0, 0.6, 0.5, 0.45], "val_loss": [1.1, 0.8, 0.7, 0.75], "best_epoch": 2}
    >>> ax = st.pl.training_curves(history, show=False)
    >>> [line.get_label() for line in ax.get_lines()]
    ['training loss', 'validation loss', 'best epoch = 2']
    """
    history = _history(model_or_history)
    curves = _curves(history)
    if metrics is None:
        chosen = list(curves)
        if not chosen:
            msg = f"The history holds no per-epoch values (keys: {sorted(history)}); was the model trained?"
            raise InputError(msg)
    else:
        chosen = [metrics] if isinstance(metrics, str) else list(metrics)
        missing = [m for m in chosen if m not in curves]
        if missing:
            msg = f"No per-epoch values for {missing} in the history; it has {sorted(curves)}."
            raise KeyError(msg)
    if logy and any((curves[m] <= 0).any() for m in chosen):
        msg = "logy=True needs positive values, but a loss is zero or negative; draw with logy=False."
        raise InputError(msg)
    show = resolve_show(show, ax=ax, save=save)
    ax = axes_or_new(ax, show, figsize=figsize, dpi=dpi)
    for m in chosen:
        ax.plot(np.arange(curves[m].size), curves[m], marker="o", ms=3, label=_LABELS.get(m, m))
    best = history.get("best_epoch")
    if isinstance(best, int | np.integer) and best >= 0:
        ax.axvline(int(best), color="0.4", ls="--", lw=1, label=f"best epoch = {int(best)}")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return finish(ax.figure, ax, show=show, save=save, dpi=dpi)
