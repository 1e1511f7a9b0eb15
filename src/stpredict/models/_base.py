"""The protocol every dense model satisfies, so that predict_dense, aggregate and evaluate treat all alike."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np

__all__ = ["DenseModel"]


@runtime_checkable
class DenseModel(Protocol):
    """What :func:`stpredict.tl.predict_dense` needs from a model (PixNet and the baselines alike).

    Two optional attributes change how :func:`~stpredict.tl.predict_dense` tiles the slide:

    - ``tiling``: ``"blend"`` (default: neighbouring tiles overlap by more than twice the context and are blended
      across the overlap) or ``"partition"`` (tiles overlap by exactly twice the context, so every map pixel comes
      from the core of one tile; the tile cores lie on a grid of ``tile_size - 2 * context`` model pixels that
      starts at the image origin). MagNet, whose bins and context tiles live on grids anchored at the image origin,
      uses ``"partition"``.
    - ``uses_tile_origins``: when true, ``predict_tiles`` is also given ``origins=``, the model-pixel position
      ``(y, x)`` of each tile's first pixel (negative for tiles that start before the image).

    Attributes
    ----------
    name
        Short name used in default keys, e.g. ``"pixnet"``.
    var_names
        Gene names, one output channel each, in order.
    um_per_px
        Micrometres per pixel of the input tiles the model expects; slides are resampled to it.
    output_stride
        Input pixels per output pixel (1 = full input resolution).
    tile_size
        Preferred input tile size in pixels (square); a multiple of ``output_stride``.
    context
        Input pixels on each side of a tile whose predictions are unreliable (blended away when stitching).
    value_kind
        ``"density"`` (expected counts per µm², aggregate by sum) or ``"intensive"`` (aggregate by mean).
    """

    name: str
    var_names: list[str]
    um_per_px: float
    output_stride: int
    tile_size: int
    context: int
    value_kind: Literal["density", "intensive"]

    def predict_tiles(self, tiles: np.ndarray, *, device: str = "auto") -> np.ndarray:
        """Predict maps for a batch of RGB tiles.

        Parameters
        ----------
        tiles
            ``uint8`` array ``(batch, 3, tile_size, tile_size)`` at :attr:`um_per_px`.
        device
            Torch device, or ``"auto"``.

        Returns
        -------
        ``float32`` array ``(batch, n_genes, tile_size // output_stride, tile_size // output_stride)``.
        """
        ...
