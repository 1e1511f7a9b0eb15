from __future__ import annotations

import json

import numpy as np
import pytest

from stpredict import cli
from stpredict._demo import DemoConfig, format_metrics, run_demo


@pytest.mark.slow
@pytest.mark.parametrize("value_kind", ["density", "intensive"])
def test_demo_runs_the_whole_job_and_writes_its_outputs(tmp_path, value_kind):
    import spatialdata as sd

    config = DemoConfig(
        section_um=700.0,
        n_genes=4,
        max_epochs=1,
        tiles_per_epoch=8,
        batch_size=4,
        bin_sizes=(16.0, 55.0),
        value_kind=value_kind,
    )
    out = tmp_path / "demo"
    metrics = run_demo(out, config=config, show_progress_bar=False)

    for name in (
        "demo.zarr",
        "demo.png",
        "metrics.csv",
        "summary.json",
        "model/config.json",
        "model/weights.safetensors",
    ):
        assert (out / name).exists(), name
    assert set(metrics["evaluation"]) == {"measured 55 um spots", "ground-truth density"}
    truth_rows = metrics[(metrics["evaluation"] == "ground-truth density") & (metrics["metric"] == "pcc_m")]
    assert sorted(truth_rows["bin_size_um"]) == [16.0, 55.0]
    assert np.isfinite(metrics.loc[metrics["metric"] == "pcc_m", "value"]).all()
    assert "pcc_m" in format_metrics(metrics)

    sdata = sd.read_zarr(out / "demo.zarr")
    assert (
        list(sdata.images["he_pixnet"]["scale0"]["image"].coords["c"].values)
        == json.loads((out / "model/config.json").read_text())["config"]["var_names"]
    )
    assert set(json.loads((out / "summary.json").read_text())["timings_s"]) >= {"fit PixNet", "predict_dense"}


def test_cli_requires_a_command(capsys):
    with pytest.raises(SystemExit):
        cli.main([])
    assert "demo" in capsys.readouterr().err
