"""Benchmark of st.tl.aggregate: kernel bandwidth, spatialdata.aggregate, and peak memory out of core.

Run ``python benchmarks/bench_aggregate.py --out benchmarks/results/aggregate.json``. Everything is measured in one
run on one machine, so the ratios compare like with like:

1. A 50-channel 4096 × 4096 float32 map (1 µm per pixel) into 16 µm and 8 µm square bins (grid offset by 0.3 µm,
   so every bin edge cuts pixels) and into 55 µm circles on a 100 µm hexagonal lattice: seconds and GB/s of map
   read, against a plain parallel sum (numba ``prange``) over the same array — the machine's read bandwidth.
   Bins: the kernel as ``tl.aggregate`` runs it on an in-memory map (straight into ``X``), the grid kernel it runs
   on each block of a dask map, and the whole ``tl.aggregate`` call (table and obs names included). Each ratio is
   given as best time over best time and as the median over alternating pairs.
2. One 2000 × 2000 channel into 16 px bins given as labels: ``spatialdata.aggregate`` (image by labels) against
   ``st.tl.aggregate`` (labels and bins) and a numpy reshape-sum.
3. Peak RSS of a subprocess that aggregates a lazily generated dask 50 × 20,000 × 20,000 float32 map (80 GB) into
   16 µm bins.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numba
import numpy as np


def _best(fn: Any, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _paired(fa: Any, fb: Any, repeat: int) -> tuple[float, float, float]:
    """Best times of ``fa`` and ``fb`` run alternately, so both see the same machine load, and the median ratio
    ``ta / tb`` over the pairs (robust to the machine's bandwidth drifting between pairs)."""
    ta, tb = [], []
    for _ in range(repeat):
        for fn, times in ((fa, ta), (fb, tb)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return min(ta), min(tb), float(np.median(np.array(ta) / np.array(tb)))


@numba.njit(parallel=True, cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _parallel_sum(img):
    n_c, ny, nx = img.shape
    out = np.zeros((n_c, ny))
    for t in numba.prange(n_c * ny):
        c = t // ny
        y = t % ny
        s = 0.0
        row = img[c, y]
        for x in range(nx):
            s += row[x]
        out[c, y] = s
    return out.sum(axis=1)


def _map_sdata(values: np.ndarray, um_per_px: float = 1.0) -> Any:
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity, Scale

    from stpredict._meta import set_element_meta

    genes = [f"g{i}" for i in range(values.shape[0])]
    image = Image2DModel.parse(
        values,
        dims=("c", "y", "x"),
        c_coords=genes,
        transformations={"um": Scale([um_per_px, um_per_px], axes=("x", "y")), "global": Identity()},
    )
    sdata = SpatialData(images={"map": image})
    set_element_meta(sdata, "map", sdata.images["map"], {"value_kind": "density"})
    return sdata


def _hex_circles(extent: float, pitch: float, diameter: float) -> Any:
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Identity

    rows = []
    for i, y in enumerate(np.arange(diameter / 2, extent - diameter / 2, pitch * np.sqrt(3) / 2)):
        xs = np.arange(diameter / 2 + (pitch / 2 if i % 2 else 0), extent - diameter / 2, pitch)
        rows.append(np.c_[xs, np.full(xs.size, y)])
    xy = np.concatenate(rows)
    return ShapesModel.parse(
        xy, geometry=0, radius=np.full(len(xy), diameter / 2), transformations={"um": Identity(), "global": Identity()}
    )


def bench_bandwidth(repeat: int, n_c: int, size: int) -> dict[str, Any]:
    import stpredict as st
    from stpredict.kernels import axis_table, rect_sum, rect_sum_units

    rng = np.random.default_rng(0)
    values = np.empty((n_c, size, size), dtype=np.float32)
    for c in range(n_c):
        values[c] = rng.random((size, size), dtype=np.float32)
    gb = values.nbytes / 1e9
    _parallel_sum(np.ascontiguousarray(values[:1, :64, :64]))
    t_sum = _best(lambda: _parallel_sum(values), repeat)
    t_np = _best(lambda: values.sum(axis=(1, 2), dtype=np.float64), 1)
    sdata = _map_sdata(values)
    sdata.shapes["spots"] = _hex_circles(size, 100.0, 55.0)
    results: dict[str, Any] = {
        "map": f"{n_c} x {size} x {size} float32 ({gb:.2f} GB), 1 um/px",
        "map_GB": gb,
        "parallel_sum_s": t_sum,
        "parallel_sum_GBps": gb / t_sum,
        "numpy_sum_single_thread_s": t_np,
        "numba_threads": numba.get_num_threads(),
        "threading_layer": None,
        "cases": {},
    }
    for bin_um in (16.0, 8.0):
        edges = 0.3 - bin_um + bin_um * np.arange(int(np.ceil((size + bin_um) / bin_um)) + 1)
        table = axis_table(edges[:-1], edges[1:], size)
        n_b = edges.size - 1
        out = np.zeros((n_c, n_b, n_b))
        small = axis_table(edges[:-1], edges[1:], 64)
        rect_sum(values[:1, :64, :64], small, small, out)  # compile
        units = np.arange(n_b * n_b).reshape(n_b, n_b)
        x = np.empty((n_b * n_b, n_c), dtype=np.float32)
        ones = np.ones(n_b * n_b)

        def grid_kernel(table: Any = table, out: Any = out) -> None:
            out[:] = 0
            rect_sum(values, table, table, out)

        def direct_kernel(table: Any = table, units: Any = units, ones: Any = ones, x: Any = x) -> None:
            rect_sum_units(values, table, table, units, ones, x)

        t_sum_k, t_kernel, r_kernel = _paired(lambda: _parallel_sum(values), direct_kernel, repeat)
        t_sum_g, t_grid, r_grid = _paired(lambda: _parallel_sum(values), grid_kernel, repeat)
        agg = {"reduce": "sum", "inplace": False, "origin_um": (0.3, 0.3), "tissue_key": False, "bin_size": bin_um}
        st.tl.aggregate(sdata, "map", show_progress_bar=False, **agg)
        t_sum_a, t_api, r_api = _paired(
            lambda: _parallel_sum(values),
            lambda a=agg: st.tl.aggregate(sdata, "map", show_progress_bar=False, **a),
            repeat,
        )
        np.testing.assert_allclose(out.sum(axis=(1, 2)), _parallel_sum(values), rtol=1e-6)
        np.testing.assert_array_equal(x, out.reshape(n_c, -1).T.astype(np.float32))
        results["cases"][f"bins_{bin_um:g}um"] = {
            "n_units": int(n_b**2),
            "kernel_s": t_kernel,
            "kernel_GBps": gb / t_kernel,
            "parallel_sum_s_paired_with_kernel": t_sum_k,
            "kernel_fraction_of_parallel_sum": t_sum_k / t_kernel,
            "kernel_fraction_median_of_pairs": r_kernel,
            "grid_kernel_s": t_grid,
            "grid_kernel_fraction_of_parallel_sum": t_sum_g / t_grid,
            "grid_kernel_fraction_median_of_pairs": r_grid,
            "parallel_sum_s_paired_with_tl_aggregate": t_sum_a,
            "tl_aggregate_fraction_of_parallel_sum": t_sum_a / t_api,
            "tl_aggregate_fraction_median_of_pairs": r_api,
            "tl_aggregate_s": t_api,
            "tl_aggregate_GBps": gb / t_api,
        }
    st.tl.aggregate(sdata, "map", shapes_key="spots", reduce="sum", inplace=False, show_progress_bar=False)
    t_sum_s, t_spots, r_spots = _paired(
        lambda: _parallel_sum(values),
        lambda: st.tl.aggregate(sdata, "map", shapes_key="spots", reduce="sum", inplace=False, show_progress_bar=False),
        repeat,
    )
    n_spots = len(sdata.shapes["spots"])
    covered_gb = n_spots * np.pi * 27.5**2 * n_c * 4 / 1e9
    results["cases"]["circles_55um"] = {
        "n_units": n_spots,
        "tl_aggregate_s": t_spots,
        "GBps_of_covered_pixels": covered_gb / t_spots,
        "GBps_of_whole_map": gb / t_spots,
        "fraction_of_parallel_sum_whole_map": t_sum_s / t_spots,
        "fraction_median_of_pairs": r_spots,
    }
    results["threading_layer"] = numba.threading_layer()
    return results


def bench_spatialdata(size: int, bin_px: int, repeat: int) -> dict[str, Any]:
    import spatialdata as sd
    from spatialdata.models import Labels2DModel
    from spatialdata.transformations import Identity

    import stpredict as st

    rng = np.random.default_rng(1)
    values = rng.random((1, size, size), dtype=np.float32)
    sdata = _map_sdata(values)
    nb = size // bin_px
    lab = (np.arange(nb * nb, dtype=np.int32).reshape(nb, nb) + 1).repeat(bin_px, 0).repeat(bin_px, 1)
    lab[:bin_px] = 0  # spatialdata needs a background label to be present
    sdata.labels["bins"] = Labels2DModel.parse(
        lab, dims=("y", "x"), transformations={"um": Identity(), "global": Identity()}
    )
    kwargs = {"values_sdata": sdata, "by_sdata": sdata, "agg_func": "sum", "target_coordinate_system": "global"}
    t0 = time.perf_counter()
    ref = sd.aggregate(values="map", by="bins", **kwargs)
    t_sd = time.perf_counter() - t0
    labels_kw = {"labels_key": "bins", "reduce": "sum", "force": True, "inplace": False, "show_progress_bar": False}
    ours = st.tl.aggregate(sdata, "map", **labels_kw)
    t_labels = _best(lambda: st.tl.aggregate(sdata, "map", **labels_kw), repeat)
    bins_kw = {"bin_size": float(bin_px), "reduce": "sum", "force": True, "inplace": False, "tissue_key": False}
    t_bins = _best(lambda: st.tl.aggregate(sdata, "map", show_progress_bar=False, **bins_kw), repeat)
    t_reshape = _best(lambda: values[0].reshape(nb, bin_px, nb, bin_px).sum(axis=(1, 3)), repeat)
    ref_t = ref.tables["table"]
    ref_x = np.asarray(ref_t.X.todense() if hasattr(ref_t.X, "todense") else ref_t.X).ravel()
    order = np.argsort(ref_t.obs["instance_id"].to_numpy())
    max_rel = float(np.max(np.abs(np.asarray(ours.X).ravel() - ref_x[order][: ours.n_obs]) / np.abs(ref_x[order])))
    return {
        "job": f"1 x {size} x {size} float32 by labels of {bin_px} x {bin_px} px bins ({nb * nb} labels)",
        "spatialdata_aggregate_s": t_sd,
        "st_aggregate_labels_s": t_labels,
        "st_aggregate_bins_s": t_bins,
        "numpy_reshape_sum_s": t_reshape,
        "speedup_labels": t_sd / t_labels,
        "speedup_bins": t_sd / t_bins,
        "max_relative_difference": max_rel,
    }


_RSS_SCRIPT = r"""
import json, sys, time
import dask
import dask.array as da
import numpy as np
sys.path.insert(0, {bench_dir!r})
from bench_aggregate import _map_sdata
import stpredict as st

n_c, size, chunk = {n_c}, {size}, {chunk}
arr = da.ones((n_c, size, size), dtype=np.float32, chunks=(n_c, chunk, chunk))
def shade(b, block_info=None):
    return b * np.float32(1 + 0.001 * sum(block_info[0]["chunk-location"]))
arr = arr.map_blocks(shade, dtype=np.float32)
dask.config.set(scheduler="threads")
sdata = _map_sdata(arr)
def status(field):  # kB from /proc (ru_maxrss would include the parent's peak: Linux keeps it across exec)
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

base = status("VmRSS")
t0 = time.perf_counter()
table = st.tl.aggregate(sdata, "map", bin_size={bin_um}, reduce="sum", inplace=False, tissue_key=False,
                        show_progress_bar=False)
dt = time.perf_counter() - t0
peak = status("VmHWM")
print(json.dumps({{"seconds": dt, "peak_rss_GB": peak / 1e6, "rss_before_GB": base / 1e6, "n_bins": table.n_obs,
                  "map_GB": n_c * size * size * 4 / 1e9}}))
"""


def bench_rss(n_c: int, size: int, chunk: int, bin_um: float) -> dict[str, Any]:
    script = _RSS_SCRIPT.format(bench_dir=str(Path(__file__).parent), n_c=n_c, size=size, chunk=chunk, bin_um=bin_um)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["job"] = f"dask {n_c} x {size} x {size} float32, chunks {chunk}, into {bin_um:g} um bins (1 um/px)"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/aggregate.json"))
    parser.add_argument("--channels", type=int, default=50)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sd-size", type=int, default=2000)
    parser.add_argument("--rss-size", type=int, default=20000)
    parser.add_argument("--skip-rss", action="store_true")
    args = parser.parse_args()

    result: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "numba": numba.__version__,
        }
    }
    result["bandwidth"] = bench_bandwidth(args.repeat, args.channels, args.size)
    result["vs_spatialdata"] = bench_spatialdata(args.sd_size, 16, args.repeat)
    if not args.skip_rss:
        result["out_of_core"] = bench_rss(args.channels, args.rss_size, 512, 16.0)
    result["own_peak_rss_GB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6

    bw = result["bandwidth"]
    print(f"map: {bw['map']}, numba threads {bw['numba_threads']} ({bw['threading_layer']})")
    print(f"{'case':<26}{'units':>9}{'seconds':>9}{'GB/s':>7}{'best/best':>11}{'median pair':>13}")
    print(f"{'parallel sum':<26}{'':>9}{bw['parallel_sum_s']:>9.3f}{bw['parallel_sum_GBps']:>7.1f}{1:>11.2f}")

    def row(label: str, units: int, seconds: float, best: float, median: float) -> None:
        print(f"{label:<26}{units:>9}{seconds:>9.3f}{gb / seconds:>7.1f}{best:>11.2f}{median:>13.2f}")

    gb = bw["map_GB"]
    for name, case in bw["cases"].items():
        n = case["n_units"]
        if "kernel_s" in case:
            row(f"{name} kernel", n, case["kernel_s"], case["kernel_fraction_of_parallel_sum"],
                case["kernel_fraction_median_of_pairs"])  # fmt: skip
            row(f"{name} grid kernel", n, case["grid_kernel_s"], case["grid_kernel_fraction_of_parallel_sum"],
                case["grid_kernel_fraction_median_of_pairs"])  # fmt: skip
            row(f"{name} tl.aggregate", n, case["tl_aggregate_s"], case["tl_aggregate_fraction_of_parallel_sum"],
                case["tl_aggregate_fraction_median_of_pairs"])  # fmt: skip
        else:
            row(f"{name} tl.aggregate", n, case["tl_aggregate_s"], case["fraction_of_parallel_sum_whole_map"],
                case["fraction_median_of_pairs"])  # fmt: skip
    sdr = result["vs_spatialdata"]
    print(f"\n{sdr['job']}")
    print(
        f"  spatialdata.aggregate {sdr['spatialdata_aggregate_s']:.3f} s | "
        f"st labels {sdr['st_aggregate_labels_s']:.4f} s "
        f"({sdr['speedup_labels']:.0f}x) | st bins {sdr['st_aggregate_bins_s']:.4f} s ({sdr['speedup_bins']:.0f}x) | "
        f"numpy reshape-sum {sdr['numpy_reshape_sum_s']:.4f} s | max rel diff {sdr['max_relative_difference']:.1e}"
    )
    if "out_of_core" in result:
        o = result["out_of_core"]
        if "error" in o:
            print("\nout of core: failed\n" + o["error"])
        else:
            print(
                f"\n{o['job']}: {o['seconds']:.1f} s, peak RSS {o['peak_rss_GB']:.2f} GB "
                f"(before {o['rss_before_GB']:.2f} GB), {o['n_bins']} bins"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
