"""Cost of a resumable, bit-exact ``st.tl.predict_dense``: the weights digest and the stored carries, in one process.

Usage::

    python benchmarks/bench_predict_dense_resume.py --size 8000 --genes 50 --repeats 4 --out results.json

Since resume is bit-exact, every finished unit of a resumable run (a backed SpatialData or ``tmp_dir``) also stores
the sums it carries into the unit below (``carry/*.npz`` in the work folder), and the run starts by hashing the
model's weights. This script times the same uninterrupted run with both (``after``) and without them (``before``:
``mark_done`` drops the carry and the digest is a constant), alternating ``before``/``after`` in one process so
that both see the same machine load, on the slide and conv model of ``bench_predict_dense.py`` (tissue only, map
stored in a temporary ``tmp_dir``). It also times :func:`~stpredict.tl._work_identity.model_digest` of the demo's
PixNet (efficientnet-lite0 encoder) and reports the bytes of one carry against one unit's block.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_predict_dense import ConvModel, make_sdata


class Model(ConvModel):
    """The conv model, with its network where the weights digest looks (``model.module``)."""

    @property
    def module(self):
        return self.net


def _one_run(args, *, before: bool) -> float:
    from unittest import mock

    import stpredict as st
    from stpredict.tl import _predict_dense, _zarr_writer

    sdata = make_sdata(args.size, args.slide_um)
    model = Model(args.genes, args.model_um)
    mark_done = _zarr_writer.WorkStore.mark_done
    patches = [
        mock.patch.object(_zarr_writer.WorkStore, "mark_done", lambda self, unit, carry=None: mark_done(self, unit)),
        mock.patch.object(_predict_dense, "model_digest", return_value="constant"),
    ]
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for p in patches if before else []:
            p.start()
        try:
            t0 = time.perf_counter()
            st.tl.predict_dense(sdata, model, batch_size=args.batch_size, tmp_dir=tmp, show_progress_bar=False)
            return time.perf_counter() - t0
        finally:
            for p in patches if before else []:
                p.stop()


def _digest_seconds() -> dict:
    import stpredict as st
    from stpredict.tl._work_identity import model_digest

    model = st.models.PixNet([f"G{i}" for i in range(16)], encoder="tf_efficientnet_lite0", pretrained=None,
                             um_per_px=2.0, tile_size=128, output_stride=2, seed=0)  # fmt: skip
    n_bytes = sum(t.numel() * t.element_size() for t in model.module.state_dict().values())
    model_digest(model)
    t0 = time.perf_counter()
    model_digest(model)
    return {"pixnet_weights_mb": n_bytes / 2**20, "digest_s": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=8000, help="slide side in pixels")
    p.add_argument("--genes", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--slide-um", type=float, default=0.5)
    p.add_argument("--model-um", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=4, help="before/after pairs")
    p.add_argument("--tmp", default=tempfile.gettempdir())
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    import stpredict as st

    st.settings.n_jobs = args.threads  # predict_dense sizes torch, numba and dask from it
    _one_run(args, before=False)  # warm-up: imports, numba and torch kernels
    times: dict[str, list[float]] = {"before": [], "after": []}
    for i in range(args.repeats):
        for case in ("before", "after") if i % 2 == 0 else ("after", "before"):
            times[case].append(_one_run(args, before=case == "before"))
            print(f"{case}: {times[case][-1]:.2f} s", flush=True)
    result = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": platform.platform(),
        "seconds": times,
        "median_before_s": statistics.median(times["before"]),
        "median_after_s": statistics.median(times["after"]),
        **_digest_seconds(),
    }
    result["ratio_after_before"] = result["median_after_s"] / result["median_before_s"]
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
