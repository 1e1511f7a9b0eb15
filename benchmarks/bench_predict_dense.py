"""Benchmark of ``st.tl.predict_dense`` on a lazily generated slide: peak memory and overhead over bare inference.

Usage::

    python benchmarks/bench_predict_dense.py --size 20000 --genes 50 --out benchmarks/results/predict_dense.json

The slide is a dask array generated chunk by chunk from a deterministic function (white glass, an elliptical
tissue section with stain-like texture), never held in memory; its tissue mask is drawn analytically at 8 µm/px.
The model is a small torch conv stack (3→16→32→32 channels, two stride-2 convolutions, 1×1 head to ``--genes``
channels: output stride 4, 256 px tiles). Each measurement runs in its own subprocess, which reports its peak
resident memory (``resource.getrusage``):

* ``predict_dense``: the whole call, into a temporary zarr store (the SpatialData is not backed), with
  ``tissue_only=True``; the model counts the tiles it is given;
* ``bare_forward``: the same model's ``predict_tiles`` on the same number of tiles in the same batch size,
  from one pre-built uint8 batch (no reading, resampling, blending or writing);
* ``read_slide``: computing every chunk of the slide once (what generating the lazy input costs).

The overhead ratio ``predict_dense / bare_forward`` is what the acceptance criterion bounds (≤ 1.3).

``--model magnet`` measures :class:`stpredict.models.MagNet` instead (8 µm bins, a small configuration: timm's
``test_efficientnet`` for both encoders, width 32; the CPU budget, not the paper's size), e.g.::

    python benchmarks/bench_predict_dense.py --model magnet --size 20000 --slide-um 0.25 --model-um 1 \
        --genes 50 --batch-size 1 --out benchmarks/results/predict_dense_magnet.json

Its bare forward is ``MagNet.predict_tiles`` (crops cut from the tile, both encoders, cross-attention and the
graph module) on as many pre-built tiles as predict_dense predicted, each at a tile origin on the region grid.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TILE = 256
STRIDE = 4
CHUNK = 2048


# ------------------------------------------------------------------------------------------------ slide and model
def _render(y0: int, x0: int, h: int, w: int, size: int) -> np.ndarray:
    """uint8 RGB block of the synthetic slide at full resolution."""
    yy = (np.arange(y0, y0 + h, dtype=np.float32) + 0.5)[:, None]
    xx = (np.arange(x0, x0 + w, dtype=np.float32) + 0.5)[None, :]
    c = size / 2
    inside = ((yy - c) / (0.42 * size)) ** 2 + ((xx - c) / (0.36 * size)) ** 2 <= 1.0
    rng = np.random.default_rng([y0, x0])
    noise = rng.random((h, w), dtype=np.float32)
    texture = 0.5 + 0.25 * np.sin(yy / 7.0) * np.cos(xx / 11.0) + 0.25 * noise
    out = np.empty((3, h, w), dtype=np.uint8)
    for k, (base, amp) in enumerate(((215, 60), (140, 90), (190, 40))):
        out[k] = np.where(inside, base - amp * texture, 245).astype(np.uint8)
    return out


def make_sdata(size: int, um_per_px: float):
    import dask.array as da
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, Labels2DModel
    from spatialdata.transformations import Scale, Sequence, get_transformation

    from stpredict._geometry import set_um_per_px

    def block(block_info=None):
        (y0, y1), (x0, x1) = block_info[None]["array-location"][1:]
        return _render(y0, x0, y1 - y0, x1 - x0, size)

    image = da.map_blocks(block, dtype=np.uint8, chunks=((3,), *(da.core.normalize_chunks(CHUNK, (size, size)))))
    el = Image2DModel.parse(image, dims=("c", "y", "x"), c_coords=["r", "g", "b"], chunks=(3, CHUNK, CHUNK))
    sdata = SpatialData(images={"he": el})
    set_um_per_px(sdata, "he", um_per_px)
    down = max(1, round(8.0 / um_per_px))
    m = -(-size // down)
    yy = (np.arange(m) + 0.5)[:, None] * down
    xx = (np.arange(m) + 0.5)[None, :] * down
    c = size / 2
    mask = (((yy - c) / (0.42 * size)) ** 2 + ((xx - c) / (0.36 * size)) ** 2 <= 1.02).astype(np.uint8)
    tr = {
        cs: Sequence([Scale([down, down], axes=("x", "y")), t])
        for cs, t in get_transformation(sdata.images["he"], get_all=True).items()
    }
    sdata.labels["he_tissue"] = Labels2DModel.parse(mask, dims=("y", "x"), transformations=tr)
    return sdata


class ConvModel:
    """A cheap dense model satisfying ``stpredict.models.DenseModel`` (torch, CPU)."""

    name = "bench"
    value_kind = "intensive"
    output_stride = STRIDE
    tile_size = TILE
    context = 8

    def __init__(self, n_genes: int, um_per_px: float) -> None:
        import torch
        from torch import nn

        torch.manual_seed(0)
        self.var_names = [f"Gene{g:03d}" for g in range(n_genes)]
        self.um_per_px = um_per_px
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, n_genes, 1),
        ).eval()
        self.n_tiles = 0

    def predict_tiles(self, tiles: np.ndarray, *, device: str = "auto") -> np.ndarray:
        import torch

        self.n_tiles += len(tiles)
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(tiles)).float().div_(255.0)
            return self.net(x).numpy()


def make_model(args):
    """The model measured: the conv stack, or a small MagNet that counts the tiles it predicts."""
    if args.model == "conv":
        return ConvModel(args.genes, args.model_um)
    from stpredict.models import MagNet

    class CountingMagNet(MagNet):
        n_tiles = 0

        def predict_tiles(self, tiles, **kwargs):
            self.n_tiles += len(tiles)
            return super().predict_tiles(tiles, **kwargs)

    genes = [f"Gene{g:03d}" for g in range(args.genes)]
    return CountingMagNet(
        genes, um_per_px=args.model_um, encoder="test_efficientnet", pretrained=None, dim=32, num_heads=4
    )


# ------------------------------------------------------------------------------------------------ measurements
def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def run_predict(args) -> dict:

    import stpredict as st

    st.settings.n_jobs = args.threads  # predict_dense sizes torch, numba and dask from it
    sdata = make_sdata(args.size, args.slide_um)
    model = make_model(args)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        t0, c0 = time.perf_counter(), _cpu_s()
        st.tl.predict_dense(
            sdata, model, batch_size=args.batch_size, dtype=args.dtype, tmp_dir=tmp, show_progress_bar=False
        )
        wall, cpu = time.perf_counter() - t0, _cpu_s() - c0
        arr = st._geometry.scale_levels(sdata.images[f"he_{model.name}"])[0]
        shape = list(arr.shape)
        probe = float(arr[:, arr.shape[1] // 2, arr.shape[2] // 2].mean().compute())
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_mb": _peak_rss_mb(), "n_tiles": model.n_tiles,
            "map_shape": shape, "map_centre_mean": probe}  # fmt: skip


def run_bare(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    model = make_model(args)
    rng = np.random.default_rng(0)
    tile = model.tile_size
    batch = rng.integers(0, 256, size=(args.batch_size, 3, tile, tile), dtype=np.uint8)
    extra = {"origins": np.zeros((args.batch_size, 2), np.int64)} if args.model == "magnet" else {}
    n_done = 0
    t0, c0 = time.perf_counter(), _cpu_s()
    while n_done < args.n_tiles:
        k = min(args.batch_size, args.n_tiles - n_done)
        model.predict_tiles(batch[:k], **{key: v[:k] for key, v in extra.items()})
        n_done += k
    wall, cpu = time.perf_counter() - t0, _cpu_s() - c0
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_mb": _peak_rss_mb(), "n_tiles": n_done}


def run_read(args) -> dict:
    import dask

    sdata = make_sdata(args.size, args.slide_um)
    from stpredict._geometry import scale_levels

    data = scale_levels(sdata.images["he"])[0].data
    t0, c0 = time.perf_counter(), _cpu_s()
    data.map_blocks(lambda b: np.zeros((1, 1, 1), np.uint8), chunks=(1, 1, 1)).sum().compute(scheduler="threads")
    del dask
    return {"wall_s": time.perf_counter() - t0, "cpu_s": _cpu_s() - c0, "peak_rss_mb": _peak_rss_mb()}


def _child(mode: str, args, **extra) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, *_forward(args)]
    for k, v in extra.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode:
        sys.stderr.write(out.stderr)
        msg = f"{mode} failed"
        raise RuntimeError(msg)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _forward(args) -> list[str]:
    keys = ("size", "genes", "batch_size", "threads", "dtype", "slide_um", "model_um", "tmp", "model")
    return [x for k in keys for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=20000, help="slide side in pixels")
    p.add_argument("--genes", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--slide-um", type=float, default=0.5, help="slide µm per pixel")
    p.add_argument("--model-um", type=float, default=0.5, help="model µm per pixel")
    p.add_argument("--tmp", default=tempfile.gettempdir(), help="folder for the temporary map store")
    p.add_argument("--model", default="conv", choices=["conv", "magnet"], help="model measured")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--n-tiles", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        fn = {"predict": run_predict, "bare": run_bare, "read": run_read}[args.child]
        print(json.dumps(fn(args)))
        return

    predict = _child("predict", args)
    bare = _child("bare", args, n_tiles=predict["n_tiles"])
    read = _child("read", args)
    ratio = predict["wall_s"] / bare["wall_s"]
    cpu_ratio = predict["cpu_s"] / bare["cpu_s"]
    result = {
        "benchmark": "predict_dense",
        "params": {
            k: getattr(args, k)
            for k in ("size", "genes", "batch_size", "threads", "dtype", "slide_um", "model_um", "model")
        },  # fmt: skip
        "model": {"name": args.model, "tile_size": TILE, "output_stride": STRIDE, "context": ConvModel.context}
        if args.model == "conv"
        else {"name": "magnet", "config": "test_efficientnet encoders, dim 32, bin_um 8, core_tiles 4"},
        "machine": {"platform": platform.platform(), "cpus": __import__("os").cpu_count()},
        "predict_dense": predict,
        "bare_forward": bare,
        "read_slide": read,
        "overhead_ratio": ratio,
        "cpu_overhead_ratio": cpu_ratio,
        "load_average_1min": __import__("os").getloadavg()[0],
        "criteria": {"peak_rss_mb_max": 3072, "overhead_ratio_max": 1.3},
        "pass": {"rss": predict["peak_rss_mb"] < 3072, "overhead": ratio <= 1.3},
    }
    print(f"slide {args.size}² px, {args.genes} genes, {predict['n_tiles']} tiles, map {predict['map_shape']}")
    print(f"{'':16}{'wall s':>10}{'CPU s':>10}{'peak RSS MB':>14}")
    for name in ("predict_dense", "bare_forward", "read_slide"):
        r = result[name]
        print(f"{name:16}{r['wall_s']:>10.1f}{r['cpu_s']:>10.1f}{r['peak_rss_mb']:>14.0f}")
    print(f"predict_dense / bare_forward: wall {ratio:.3f}, CPU {cpu_ratio:.3f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
