"""The main job on built-in synthetic data: tissue → preprocess → fit PixNet → predict_dense → aggregate → evaluate.

Run it with ``stpredict demo``. Everything it makes lands in one folder: the SpatialData zarr of the held-out
section (H&E, ground truth, predicted map, tables at every bin size), a PNG figure and ``metrics.csv``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stpredict._elements import quiet_zarr_writes
from stpredict._logging import get_logger
from stpredict._outputs import output_folder

if TYPE_CHECKING:
    from collections.abc import Mapping

    import pandas as pd
    from spatialdata import SpatialData

__all__ = ["DemoConfig", "run_demo"]

logger = get_logger(__name__)


@dataclass
class DemoConfig:
    """Sizes of the demo; the defaults run in a few minutes on two CPU cores.

    Attributes
    ----------
    section_um
        Side of each synthetic section in µm (height = width).
    n_genes
        Genes simulated and predicted.
    model_um_per_px
        Resolution the model sees; the 0.5 µm/px slides are resampled to it.
    layout
        Measured units of the synthetic sections (``"visium"``: 55 µm spots at 100 µm pitch).
    tile_size
        Model input tile in pixels.
    decoder_channels
        PixNet decoder channels at strides 1, 2, 4, ...; six entries reach the encoder's stride-32 stage.
    max_epochs, tiles_per_epoch, batch_size, lr
        Training budget.
    value_kind
        ``"density"``: expected counts per µm², trained with a Poisson loss on the raw spot counts (the synthetic
        counts are Poisson draws of a linear density, and this mode scores higher on them at every scale);
        ``"intensive"``: PixNet's default, log1p CPM values trained with the paper's loss, which scores higher on
        real her2st sections (``benchmarks/README.md``).
    bin_sizes
        Square bin sizes in µm for the cross-scale evaluation.
    seed
        Seeds the tissue, the model and the training.
    """

    section_um: float = 1600.0
    layout: str = "visium"
    n_genes: int = 16
    model_um_per_px: float = 2.0
    tile_size: int = 128
    decoder_channels: tuple[int, ...] = (32, 64, 128, 192, 256, 320)
    max_epochs: int = 20
    tiles_per_epoch: int = 96
    batch_size: int = 8
    lr: float = 2e-3
    value_kind: str = "density"
    bin_sizes: tuple[float, ...] = (8.0, 16.0, 55.0)
    seed: int = 0
    timings: dict[str, float] = field(default_factory=dict)


def demo_pixnet(genes: list[str], config: DemoConfig, *, value_kind: str | None = None) -> Any:
    """The demo's PixNet: offline EfficientNet-Lite0 weights, frozen encoder, channel attention, stride 2.

    ``value_kind`` defaults to ``config.value_kind``. The demo, ``stpredict benchmark`` and ``bench_load.py`` build it.
    """
    import stpredict as st

    return st.models.PixNet(
        genes,
        encoder="tf_efficientnet_lite0",
        pretrained="efficientnet-lite0",
        um_per_px=config.model_um_per_px,
        tile_size=config.tile_size,
        output_stride=2,
        decoder_channels=config.decoder_channels,
        attention="channel",
        freeze_encoder=True,
        value_kind=value_kind or config.value_kind,
        seed=config.seed,
    )


def _section(config: DemoConfig, name: str, patient: str, seed: int) -> SpatialData:
    import stpredict as st

    return st.datasets.synthetic(
        shape_um=(config.section_um, config.section_um),
        n_genes=config.n_genes,
        layout=config.layout,
        seed=seed,
        section=name,
        patient=patient,
    )


def run_demo(
    out_dir: str | Path = "stpredict_demo",
    *,
    config: DemoConfig | None = None,
    overwrite: bool = True,
    show_progress_bar: bool | None = None,
    fit_kwargs: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """Run the whole job on synthetic data and write the results to ``out_dir``.

    Three synthetic sections from three "patients" are generated; the model is trained on the measured
    Visium-like spot counts of the first, validated on the second, and evaluated on the held-out third:
    against its measured spots, and against the ground-truth expression density at every bin size in
    ``config.bin_sizes``.

    Parameters
    ----------
    out_dir
        Folder for ``demo.zarr``, ``demo.png``, ``metrics.csv``, ``summary.json`` and the model checkpoint; it is
        created, or used when empty, and marked with a ``.stpredict-output`` file. A folder holding anything the
        demo did not write is refused before any work starts, and nothing in it is touched.
    config
        Sizes and budget; :class:`DemoConfig` defaults when ``None``.
    overwrite
        Replace an earlier demo output in ``out_dir`` (recognised by its marker); the new output is moved into
        place only once complete, so a failed run leaves the earlier one as it was.
    show_progress_bar
        Progress bars for training and prediction; ``settings.show_progress_bar`` when ``None``.
    fit_kwargs
        Progress options for :meth:`~stpredict.models.PixNet.fit` that take precedence, e.g.
        ``{"show_progress_bar": False, "callbacks": [...]}`` for a Lightning callback that prints one line per epoch
        (``stpredict demo`` does this when its output is not a terminal).

    Each step is logged (``stpredict`` logger, level INFO) when it starts and when it ends, with its time.

    Returns
    -------
    Tidy metrics table: one row per (evaluation, bin size, metric).

    Raises
    ------
    stpredict._outputs.OutputFolderError
        ``out_dir`` holds something the demo did not write, or an earlier output without ``overwrite``.
    """
    config = config or DemoConfig()
    with output_folder(out_dir, written_by="stpredict demo", overwrite=overwrite, option="`out_dir`") as out:
        metrics = _run(out, config, show_progress_bar=show_progress_bar, fit_kwargs=fit_kwargs)
    return metrics


_STEPS = 6  # the steps that `tick` times, announced as [i/6]


def _run(
    out: Path,
    config: DemoConfig,
    *,
    show_progress_bar: bool | None,
    fit_kwargs: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """The demo's work, writing its outputs into the folder ``out``."""
    import pandas as pd

    import stpredict as st

    timings: dict[str, float] = {}

    def begin(step: str, detail: str = "") -> float:
        """Announce a step before it starts (a long step must not look like a hung run)."""
        logger.info("[%d/%d] %s%s ...", len(timings) + 1, _STEPS, step, f" ({detail})" if detail else "")
        return time.perf_counter()

    def tick(step: str, start: float) -> float:
        timings[step] = round(time.perf_counter() - start, 2)
        logger.info("[%d/%d] %s: done in %.1f s", len(timings), _STEPS, step, timings[step])
        return time.perf_counter()

    side = f"{config.section_um:g} µm"
    t = begin("synthetic tissue (3 sections)", f"{side} × {side}, {config.n_genes} genes, {config.layout} spots")
    train, val, test = (
        _section(config, name, patient, config.seed + i)
        for i, (name, patient) in enumerate([("train", "P0"), ("val", "P1"), ("test", "P2")])
    )
    t = tick("synthetic tissue (3 sections)", t)

    t = begin("preprocess", "tissue masks, genes, log1p CPM")
    for sdata in (train, val, test):
        st.pp.tissue_mask(sdata, "he")
    genes = st.pp.select_genes([train.tables["table"]], n_top=config.n_genes)
    train_table = train.tables["table"]
    st.pp.normalize(train_table, method="log1p_cpm")
    params = train_table.uns["stpredict"]["normalize"]["log1p_cpm"]
    for sdata in (val, test):
        st.pp.normalize(sdata.tables["table"], method="log1p_cpm", params=params)
    t = tick("preprocess", t)

    t = begin(
        "fit PixNet",
        f"{config.max_epochs} epochs of {config.tiles_per_epoch} tiles of {config.tile_size} px, {config.value_kind}",
    )
    model = demo_pixnet(genes, config)
    density = model.value_kind == "density"
    model.fit(
        train,
        validation_data=val,
        **({"loss": "poisson"} if density else {"target_layer": "log1p_cpm"}),
        max_epochs=config.max_epochs,
        tiles_per_epoch=config.tiles_per_epoch,
        batch_size=config.batch_size,
        lr=config.lr,
        seed=config.seed,
        **{"show_progress_bar": show_progress_bar, **(fit_kwargs or {})},
    )
    model.save(out / "model")
    t = tick("fit PixNet", t)

    t = begin("predict_dense", "held-out section")
    map_key = "he_pixnet"
    st.tl.predict_dense(test, model, image_key="he", key_added=map_key, show_progress_bar=show_progress_bar)
    t = tick("predict_dense", t)

    sizes = ", ".join(f"{b:g}" for b in config.bin_sizes)
    t = begin("aggregate + evaluate", f"measured spots and bins of {sizes} µm")
    rows: list[dict[str, Any]] = []
    measured_pred = st.tl.aggregate(test, map_key, shapes_key="spots", key_added="he_pixnet_spots", inplace=False)
    if density:  # expected counts per spot, normalised like the measured counts (training parameters)
        spot_result = st.tl.evaluate(measured_pred, test.tables["table"], normalize=params, genes=genes)
    else:
        spot_result = st.tl.evaluate(measured_pred, test.tables["table"], truth_layer="log1p_cpm", genes=genes)
    rows += [
        {"evaluation": "measured 55 um spots", "bin_size_um": 55.0, "metric": k, "value": v}
        for k, v in spot_result.summary.items()
    ]
    scales = st.tl.evaluate_across_scales(
        test,
        map_key,
        bin_sizes=list(config.bin_sizes),
        truth_map_key="truth",
        genes=genes,
        aggregate_kwargs={"force": True},
    )
    # An intensive map is on another scale than the truth (counts per µm²): against the truth only correlations are
    # reported, for either kind of map, so that the table reads the same for both.
    scales = scales[scales["metric"].str.startswith(("pcc", "spearman", "ssim"))]
    scales = scales.assign(evaluation="ground-truth density")
    metrics = pd.concat([pd.DataFrame(rows), scales], ignore_index=True)
    t = tick("aggregate + evaluate", t)

    t = begin("write zarr + figure")
    _figure(test, map_key, genes[:3]).savefig(out / "demo.png", dpi=100, bbox_inches="tight")
    with quiet_zarr_writes():
        test.write(out / "demo.zarr")
    metrics.to_csv(out / "metrics.csv", index=False)
    tick("write zarr + figure", t)
    (out / "summary.json").write_text(json.dumps({"timings_s": timings}, indent=2))
    config.timings.update(timings)
    return metrics


def _figure(sdata: SpatialData, map_key: str, genes: list[str]) -> Any:
    """H&E with the true density (top row) and the predicted map (bottom row) of a few genes."""
    import matplotlib

    import stpredict as st

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    n = len(genes) + 1
    fig = Figure(figsize=(3.2 * n, 6.4))
    grid = fig.subplots(2, n, sharex=True, sharey=True)
    for row, key, label in ((0, "truth", "true"), (1, map_key, "predicted")):
        st.pl.gene_map(sdata, genes, map_key=key, image_key="he", overlay=False, ax=grid[row])
        for ax, gene in zip(grid[row][1:], genes, strict=True):
            ax.set_title(f"{gene} ({label})")
    return fig


def format_metrics(metrics: pd.DataFrame, names: tuple[str, ...] = ("pcc_m", "pcc_s", "pcc_f", "mse")) -> str:
    """A compact text table: rows = (evaluation, bin size), columns = metrics."""
    table = metrics[metrics["metric"].isin(names)].pivot_table(
        index=["evaluation", "bin_size_um"], columns="metric", values="value"
    )
    return table.reindex(columns=[n for n in names if n in table.columns]).round(3).to_string()


def describe(out_dir: str | Path, metrics: pd.DataFrame, timings: dict[str, Any]) -> str:
    """The text that ``stpredict demo`` prints at the end."""
    lines = ["", "stpredict demo: held-out synthetic section", "", format_metrics(metrics), "", "timings (s):"]
    lines += [f"  {step:<32}{seconds:>8.1f}" for step, seconds in timings.items()]
    lines += ["", f"results in {Path(out_dir).resolve()}: demo.zarr, demo.png, metrics.csv, model/"]
    return "\n".join(lines)
