"""Helpers for the model tests: tiny synthetic SpatialData, a tiny model, a small PixNet (loaded by path: tests are
not a package)."""

from __future__ import annotations

import numpy as np


def make_sdata(
    *,
    seed: int = 0,
    size: int = 192,
    um_per_px: float = 1.0,
    spacing: float = 16.0,
    radius: float = 6.0,
    squares: bool = False,
    n_genes: int = 3,
    scale_factors: list[int] | None = None,
) -> object:
    """An image whose red blobs drive gene 0 (and its inverse gene 1), spots on a grid, Poisson counts.

    Geometry is in pixels of the image; ``um_per_px`` is written as the calibration.
    """
    import anndata as ad
    import geopandas as gpd
    import pandas as pd
    from scipy import sparse
    from shapely.geometry import Point, box
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel

    from stpredict._geometry import set_um_per_px

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    signal = np.zeros((size, size))
    for _ in range(8):
        cx, cy = rng.uniform(0, size, 2)
        signal += np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 14.0**2))
    signal = signal / signal.max()
    img = np.empty((3, size, size), dtype=np.uint8)
    img[0] = np.clip(80 + 170 * signal + rng.normal(0, 5, (size, size)), 0, 255)
    img[1] = np.clip(120 - 60 * signal + rng.normal(0, 5, (size, size)), 0, 255)
    img[2] = np.clip(160 + rng.normal(0, 5, (size, size)), 0, 255)
    image = Image2DModel.parse(img, dims=("c", "y", "x"), c_coords=["r", "g", "b"], scale_factors=scale_factors)

    grid = np.arange(spacing / 2, size - spacing / 2 + 1e-9, spacing)
    cx, cy = (a.ravel() for a in np.meshgrid(grid, grid))
    n = len(cx)
    if squares:
        geoms = [box(x - radius, y - radius, x + radius, y + radius) for x, y in zip(cx, cy, strict=True)]
        shapes = ShapesModel.parse(gpd.GeoDataFrame(geometry=geoms, index=np.arange(n)))
    else:
        shapes = ShapesModel.parse(
            gpd.GeoDataFrame(
                {"radius": np.full(n, radius)}, geometry=[Point(x, y) for x, y in zip(cx, cy, strict=True)]
            )
        )
    s = signal[np.clip(cy.astype(int), 0, size - 1), np.clip(cx.astype(int), 0, size - 1)]
    lam = np.column_stack([5 + 60 * s, 40 - 30 * s] + [np.full(n, 20.0)] * (n_genes - 2))
    counts = rng.poisson(lam).astype(np.float32)
    obs = pd.DataFrame({"region": pd.Categorical(["spots"] * n), "instance_id": np.arange(n)})
    obs.index = obs.index.astype(str)
    adata = ad.AnnData(sparse.csr_matrix(counts), obs=obs)
    adata.var_names = [f"g{i}" for i in range(n_genes)]
    adata.obsm["spatial"] = np.column_stack([cx, cy])
    table = TableModel.parse(adata, region="spots", region_key="region", instance_key="instance_id")
    sdata = SpatialData(images={"he": image}, shapes={"spots": shapes}, tables={"table": table})
    set_um_per_px(sdata, "he", um_per_px)
    return sdata


class TinyModel:
    """Stand-in for PixNet: a 2-layer conv net producing a map at ``output_stride``."""

    def __init__(self, genes: list[str], *, value_kind: str = "intensive", stride: int = 4, tile: int = 64) -> None:
        import torch
        from torch import nn

        torch.manual_seed(0)
        layers: list[nn.Module] = [
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.AvgPool2d(stride),
            nn.Conv2d(8, len(genes), 1),
        ]
        if value_kind == "density":
            layers.append(nn.Softplus())
        self.module = nn.Sequential(*layers)
        self.name = "tiny"
        self.var_names = list(genes)
        self.um_per_px = 1.0
        self.output_stride = stride
        self.tile_size = tile
        self.context = 0
        self.value_kind = value_kind
        self.normalization = None


#: Decoder channels and genes of the small PixNet the model tests build.
SMALL_DECODER = (8, 16, 16, 32, 32, 32)
PIXNET_GENES = ["ACTB", "EPCAM", "PTPRC"]


def small_pixnet(**kwargs):
    """A small, seeded PixNet on 32 px tiles; ``kwargs`` override its parameters."""
    import stpredict as st

    # the pre-recipe constructor defaults (1 µm/px, full-resolution map, random encoder): what these tests were built on
    params = {"tile_size": 32, "decoder_channels": SMALL_DECODER, "seed": 0, "um_per_px": 1.0, "output_stride": 1,
              "attention": "spatial", "pretrained": None}  # fmt: skip
    params.update(kwargs)
    return st.models.PixNet(PIXNET_GENES, **params)
