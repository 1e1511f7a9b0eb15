from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

import stpredict as st
from stpredict import _demo as demo_module
from stpredict import cli
from stpredict._demo import DemoConfig, format_metrics, run_demo
from stpredict._outputs import MARKER_NAME
from stpredict.errors import OutputFolderError


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
    assert json.loads((out / MARKER_NAME).read_text())["entries"] == [
        "demo.png",
        "demo.zarr",
        "metrics.csv",
        "model",
        "summary.json",
    ]


def test_cli_requires_a_command(capsys):
    with pytest.raises(SystemExit):
        cli.main([])
    assert "demo" in capsys.readouterr().err


class _Ran(Exception):
    """Raised by the patched first step of the demo: the run got past the output-folder checks."""


@pytest.fixture
def no_demo_work(monkeypatch):
    """The demo's first step raises :class:`_Ran`, so a test sees whether a run would have started."""

    def section(*args, **kwargs):
        raise _Ran

    monkeypatch.setattr(demo_module, "_section", section)


@pytest.fixture
def quick_demo(monkeypatch):
    """The demo's work replaced by writing two outputs; setting ``["fail"]`` makes it fail halfway."""
    state = {"fail": False}

    def run(out, config, *, show_progress_bar, fit_kwargs=None):
        (out / "metrics.csv").write_text(f"seed {config.seed}")
        if state["fail"]:
            msg = "boom"
            raise RuntimeError(msg)
        (out / "model").mkdir()
        return pd.DataFrame({"metric": ["pcc_m"], "value": [float(config.seed)]})

    monkeypatch.setattr(demo_module, "_run", run)
    return state


def test_demo_refuses_a_folder_holding_a_users_file(tmp_path, no_demo_work):
    out = tmp_path / "results"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    with pytest.raises(OutputFolderError, match=r"holds notes\.txt.*another `out_dir`.*yourself"):
        run_demo(out, config=DemoConfig())
    assert os.listdir(out) == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "my notes"


@pytest.mark.parametrize("out", [".", "results"])
def test_cli_demo_refuses_a_folder_it_did_not_write(tmp_path, monkeypatch, capsys, no_demo_work, out):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "notes.txt").write_text("my notes")
    (tmp_path / "notes.txt").write_text("my notes")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["demo", "--out", out, "--quick"]) == 2  # bad input: the message names the fix
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"stpredict demo: error: The output folder {out!r} already holds ")
    assert "Choose another --out" in err
    assert "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["notes.txt", "results"]
    assert os.listdir(tmp_path / "results") == ["notes.txt"]


def test_demo_uses_an_empty_folder_and_replaces_its_own_earlier_output(tmp_path, quick_demo):
    out = tmp_path / "out"
    out.mkdir()
    run_demo(out, config=DemoConfig(seed=1))
    marker = json.loads((out / MARKER_NAME).read_text())
    assert marker == {"written_by": "stpredict demo", "version": st.__version__, "entries": ["metrics.csv", "model"]}
    assert (out / "metrics.csv").read_text() == "seed 1"

    metrics = run_demo(out, config=DemoConfig(seed=2))
    assert metrics["value"].tolist() == [2.0]
    assert (out / "metrics.csv").read_text() == "seed 2"
    assert sorted(os.listdir(out)) == [MARKER_NAME, "metrics.csv", "model"]

    quick_demo["fail"] = True
    with pytest.raises(RuntimeError, match="boom"):  # a failed run keeps the earlier output
        run_demo(out, config=DemoConfig(seed=3))
    assert (out / "metrics.csv").read_text() == "seed 2"
    assert sorted(os.listdir(out)) == [MARKER_NAME, "metrics.csv", "model"]

    with pytest.raises(OutputFolderError, match="overwrite=True"):
        run_demo(out, config=DemoConfig(seed=4), overwrite=False)
    assert (out / "metrics.csv").read_text() == "seed 2"
