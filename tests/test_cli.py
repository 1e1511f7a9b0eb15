from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import stpredict as st
from stpredict import cli
from stpredict.cli import _common

YAML_CONFIG = """\
model:
  um_per_px: 2.0
  tile_size: 64
  output_stride: 2
  decoder_channels: [8, 16, 16]
  attention: channel
fit:
  max_epochs: 1
  tiles_per_epoch: 4
  batch_size: 2
"""

TOML_CONFIG = """\
[model]
um_per_px = 4.0
tile_size = 32
decoder_channels = [8, 8, 16]
value_kind = "density"

[fit]
loss = "poisson"
lr = 0.01
max_epochs = 7
"""


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    return rc, out.getvalue(), err.getvalue()


def _tree(path: Path) -> dict[str, str]:
    """Every file under ``path`` with the digest of its content."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    paths = {}
    for seed, name in enumerate(["train", "test"]):
        sdata = st.datasets.synthetic(shape_um=(500.0, 500.0), n_genes=4, layout="visium", seed=seed, section=name)
        sdata.write(root / f"{name}.zarr")
        paths[name] = root / f"{name}.zarr"
    return paths


@pytest.fixture(scope="module")
def trained(stores, tmp_path_factory):
    root = tmp_path_factory.mktemp("model")
    (root / "cfg.yaml").write_text(YAML_CONFIG)
    argv = ["train", str(stores["train"]), "--model", "pixnet", "--out", str(root / "model")]
    argv += ["--config", str(root / "cfg.yaml"), "--genes", "3", "--validation", str(stores["test"]), "--seed", "1"]
    rc, out, err = _run(argv)
    assert rc == 0, err
    return {"path": root / "model", "stdout": out, "stderr": err}


@pytest.fixture
def test_store(stores, tmp_path):
    """A copy of the test store that a test may write into."""
    path = tmp_path / "test.zarr"
    shutil.copytree(stores["test"], path)
    return path


def test_train_writes_a_model_folder_that_loads_with_the_yaml_config(trained, stores):
    import spatialdata as sd

    model = st.models.load(trained["path"])
    train_table = sd.read_zarr(stores["train"]).tables["table"]
    assert model.var_names == st.pp.select_genes([train_table], n_top=3)
    assert (model.um_per_px, model.tile_size, model.output_stride) == (2.0, 64, 2)
    assert model.config["decoder_channels"] == [8, 16, 16]
    assert model.config["attention"] == "channel"
    assert model.config["pretrained"] == "efficientnet-lite0"  # the command's default encoder weights
    assert model.config["seed"] == 1
    assert model.fit_params["max_epochs"] == 1
    assert model.fit_params["tiles_per_epoch"] == 4
    assert model.fit_params["seed"] == 1
    assert len(model.fit_history["val_loss"]) == 1  # --validation reached the fit
    # not a terminal: stages announced, one line per epoch, no progress bar
    assert "stpredict train: training pixnet ..." in trained["stderr"]
    assert "stpredict train: epoch 1/1  train_loss " in trained["stderr"]
    assert "val_loss" in trained["stderr"]
    assert f"model: {trained['path'].resolve()}" in trained["stdout"]


def test_train_toml_config_reaches_the_model_and_flags_override_it(stores, tmp_path, monkeypatch):
    seen = {}

    def fit(self, data, **kwargs):
        seen.update(kwargs)
        return self

    monkeypatch.setattr(st.models.PixNet, "fit", fit)
    (tmp_path / "cfg.toml").write_text(TOML_CONFIG)
    (tmp_path / "genes.txt").write_text("Gene001\n# a comment\nGene003\n")
    argv = ["train", str(stores["train"]), "--model", "pixnet", "--out", str(tmp_path / "m"), "-q"]
    argv += ["--config", str(tmp_path / "cfg.toml"), "--genes-file", str(tmp_path / "genes.txt"), "--max-epochs", "2"]
    rc, _, err = _run(argv)
    assert rc == 0, err
    assert err == ""  # --quiet
    model = st.models.load(tmp_path / "m")
    assert model.var_names == ["Gene001", "Gene003"]
    assert (model.um_per_px, model.tile_size, model.value_kind) == (4.0, 32, "density")
    assert seen["loss"] == "poisson"
    assert seen["lr"] == 0.01
    assert seen["max_epochs"] == 2  # the flag overrides the file
    assert seen["show_progress_bar"] is False


@pytest.mark.parametrize(
    ("text", "suffix", "expected"),
    [
        (
            "model:\n  tile_sise: 64\n",
            ".yaml",
            r"unknown model option\(s\) tile_sise .*valid model options: .*tile_size",
        ),
        ("[fit]\nmax_epoch = 3\n", ".toml", r"unknown fit option\(s\) max_epoch .*valid fit options: .*max_epochs"),
        ("trainer:\n  x: 1\n", ".yml", r"unknown section\(s\) trainer .*valid sections: model, fit"),
        ("fit:\n  validation_data: v.zarr\n", ".yaml", r"validation_data .*set by the command line"),
        ("model: [1, 2\n", ".yaml", r"cannot be parsed"),
    ],
)
def test_train_refuses_a_bad_config_with_exit_2_naming_the_valid_keys(stores, tmp_path, text, suffix, expected):
    import re

    cfg = tmp_path / f"cfg{suffix}"
    cfg.write_text(text)
    argv = ["train", str(stores["train"]), "--model", "pixnet", "--out", str(tmp_path / "m"), "--config", str(cfg)]
    rc, out, err = _run(argv)
    assert rc == 2
    assert err.count("\n") == 1, err
    assert err.startswith("stpredict train: error: --config: ")
    assert re.search(expected, err), err
    assert not (tmp_path / "m").exists()


def test_train_refuses_an_existing_model_folder_before_any_work(stores, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "notes.txt").write_text("mine")
    rc, _, err = _run(["train", str(stores["train"]), "--model", "pixnet", "--out", str(tmp_path / "m")])
    assert rc == 2
    assert "already exists; pass --overwrite" in err
    rc, _, err = _run(["train", str(stores["train"]), "--model", "pixnet", "--out", str(tmp_path / "m"), "--overwrite"])
    assert rc == 2  # --overwrite replaces only an earlier model, never the user's files
    assert (tmp_path / "m" / "notes.txt").read_text() == "mine"


def test_predict_writes_the_map_into_the_store_and_refuses_to_replace_it(trained, test_store):
    import spatialdata as sd

    rc, out, err = _run(["predict", str(test_store), "--model", str(trained["path"]), "--batch-size", "4"])
    assert rc == 0, err
    assert "images/he_pixnet" in out
    model = st.models.load(trained["path"])
    sdata = sd.read_zarr(test_store)
    written = sdata.images["he_pixnet"]["scale0"]["image"]
    assert list(written.coords["c"].values) == model.var_names
    fresh = sd.read_zarr(test_store)
    del fresh.images["he_pixnet"]
    expected = st.tl.predict_dense(fresh, model, inplace=False, batch_size=4, show_progress_bar=False)
    np.testing.assert_array_equal(written.values, expected["scale0"]["image"].values)

    before = _tree(test_store)
    rc, out, err = _run(["predict", str(test_store), "--model", str(trained["path"]), "-q"])
    assert rc == 2
    assert err.count("\n") == 1, err
    assert "already exists" in err
    assert "--overwrite" in err
    assert _tree(test_store) == before  # nothing changed

    rc, _, err = _run(["predict", str(test_store), "--model", str(trained["path"]), "--overwrite", "-q"])
    assert rc == 0, err


def _predicted_store(trained, test_store):
    rc, _, err = _run(["predict", str(test_store), "--model", str(trained["path"]), "-q"])
    assert rc == 0, err
    return test_store


def test_aggregate_writes_a_table_of_the_bin_size_and_refuses_to_replace_it(trained, test_store):
    import spatialdata as sd

    store = _predicted_store(trained, test_store)
    rc, out, err = _run(["aggregate", str(store), "--map", "he_pixnet", "--bin-size", "16"])
    assert rc == 0, err
    assert "tables/he_pixnet_16um" in out
    sdata = sd.read_zarr(store)
    table = sdata.tables["he_pixnet_16um"]
    assert "he_pixnet_16um_bins" in sdata.shapes
    assert table.uns["spatialdata_attrs"]["region"] == "he_pixnet_16um_bins"
    assert float(np.max(table.obs["area_um2"])) == pytest.approx(16.0 * 16.0)
    del sdata.tables["he_pixnet_16um"], sdata.shapes["he_pixnet_16um_bins"]
    expected = st.tl.aggregate(sdata, "he_pixnet", bin_size=16.0, inplace=False, show_progress_bar=False)
    np.testing.assert_allclose(np.asarray(table.X), np.asarray(expected.X))

    before = _tree(store)
    rc, _, err = _run(["aggregate", str(store), "--map", "he_pixnet", "--bin-size", "16"])
    assert rc == 2
    assert "already exists" in err
    assert "--overwrite" in err
    assert _tree(store) == before

    rc, _, err = _run(["aggregate", str(store), "--map", "he_pixnet", "--bin-size", "16", "--overwrite", "-q"])
    assert rc == 0, err
    assert "he_pixnet_16um" in sd.read_zarr(store).tables


def test_evaluate_prints_and_writes_the_numbers_of_tl_evaluate(trained, test_store, tmp_path):
    import spatialdata as sd

    store = _predicted_store(trained, test_store)
    rc, _, err = _run(["aggregate", str(store), "--map", "he_pixnet", "--shapes", "spots", "-q"])
    assert rc == 0, err
    before = _tree(store)
    out_json = tmp_path / "metrics.json"
    argv = ["evaluate", str(store), "--pred", "he_pixnet_spots", "--truth", "table"]
    rc, out, err = _run([*argv, "--truth-normalize", "log1p_cpm", "--json", str(out_json)])
    assert rc == 0, err
    assert _tree(store) == before  # evaluate only reads the store
    record = json.loads(out_json.read_text())

    sdata = sd.read_zarr(store)
    truth = st.pp.normalize(sdata.tables["table"], method="log1p_cpm", copy=True)
    result = st.tl.evaluate(sdata.tables["he_pixnet_spots"], truth, truth_layer="log1p_cpm", inplace=False)
    for name, value in result.summary.items():
        assert record["summary"][name] == (pytest.approx(value) if np.isfinite(value) else None)
        if np.isfinite(value):
            assert f"{name:<12}{value:>10.4f}" in out
    for gene, row in result.per_gene.iterrows():
        assert record["per_gene"][gene]["pcc"] == pytest.approx(row["pcc"])
    assert record["params"]["n_units"] == result.params["n_units"]

    rc, _, err = _run([*argv, "--truth-normalize", "log1p_cpm", "--json", str(out_json)])
    assert rc == 2  # the JSON file is not replaced without --overwrite
    assert "--overwrite" in err
    rc, _, err = _run([*argv, "--truth", "nope"])
    assert rc == 2
    assert "nope" in err
    assert "table" in err  # the message lists the tables


def test_missing_inputs_exit_2_with_one_line(tmp_path):
    rc, _, err = _run(["aggregate", str(tmp_path / "nowhere.zarr"), "--map", "m", "--bin-size", "8"])
    assert rc == 2
    assert err.count("\n") == 1
    assert "no SpatialData store at" in err
    rc, _, err = _run(["predict", str(tmp_path / "nowhere.zarr"), "--model", str(tmp_path / "nomodel")])
    assert rc == 2
    assert "stpredict train" in err  # names the fix


def test_failures_and_interrupts_have_their_own_exit_codes(monkeypatch, capsys):
    from stpredict.cli import _store

    def interrupted(args):
        raise KeyboardInterrupt

    def broken(args):
        msg = "boom"
        raise RuntimeError(msg)

    monkeypatch.setattr(_store, "_evaluate", interrupted)
    assert cli.main(["evaluate", "x.zarr", "--pred", "a", "--truth", "b"]) == 130
    monkeypatch.setattr(_store, "_evaluate", broken)
    assert cli.main(["evaluate", "x.zarr", "--pred", "a", "--truth", "b"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err
    assert "unexpected failure: RuntimeError: boom" in err
    with pytest.raises(SystemExit) as exc:  # argparse's usage errors
        cli.main(["predict", "x.zarr"])
    assert exc.value.code == 2


@pytest.mark.parametrize("command", ["train", "predict", "aggregate", "evaluate", "benchmark", "demo", None])
def test_help_describes_every_command_with_examples(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"] if command else ["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    if command is None:
        assert all(name in text for name in ("train", "predict", "aggregate", "evaluate", "benchmark", "demo"))
        assert "exit status" in text
    else:
        assert f"usage: stpredict {command}" in text
        assert "examples:\n" in text
        assert f"  stpredict {command} " in text
        assert "Exit status" in text


def test_progress_is_a_bar_on_a_terminal_and_lines_in_a_log():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert _common.Progress("x", stream=Terminal()).fit_kwargs() == {"show_progress_bar": True}
    log = io.StringIO()
    kwargs = _common.Progress("x", stream=log).fit_kwargs()
    assert kwargs["show_progress_bar"] is False
    assert len(kwargs["callbacks"]) == 1
    assert _common.Progress("x", stream=log, quiet=True).fit_kwargs() == {"show_progress_bar": False}
    with _common.Progress("x", stream=log).bars():
        assert os.environ["TQDM_MININTERVAL"] == _common.LOG_MININTERVAL
    assert "TQDM_MININTERVAL" not in os.environ


def test_demo_announces_its_steps_and_prints_epoch_lines(tmp_path, monkeypatch, caplog):
    from stpredict import _demo

    real = _demo.run_demo

    def tiny(out, *, config, **kwargs):
        config.section_um, config.n_genes, config.max_epochs, config.tiles_per_epoch = 500.0, 3, 1, 2
        config.tile_size, config.decoder_channels, config.bin_sizes, config.batch_size = 64, (8, 8, 16), (55.0,), 2
        return real(out, config=config, **kwargs)

    class Figure:  # the figure is not what this test is about
        def savefig(self, path, **kwargs):
            Path(path).write_bytes(b"png")

    monkeypatch.setattr(_demo, "run_demo", tiny)
    monkeypatch.setattr(_demo, "_figure", lambda *args: Figure())
    logger = st._logging.get_logger("stpredict")
    level = logger.level
    try:
        rc, out, err = _run(["demo", "--out", str(tmp_path / "demo")])
    finally:
        logger.setLevel(level)
    assert rc == 0, err
    # without a terminal the logging handler may be set up elsewhere: the epoch lines go to stderr directly
    assert "stpredict demo: epoch 1/1  train_loss " in err
    for step in ("[1/6] synthetic tissue", "[3/6] fit PixNet (1 epochs of 2 tiles", "[3/6] fit PixNet: done in"):
        assert step in caplog.text
    assert "stpredict demo: held-out synthetic section" in out
    assert (tmp_path / "demo" / "model" / "config.json").exists()


def test_demo_refuses_a_folder_it_did_not_write_with_exit_2(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    rc, _, err = _run(["demo", "--out", str(tmp_path)])
    assert rc == 2
    assert err.startswith("stpredict demo: error: The output folder")
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_benchmark_quick_prints_a_table_and_writes_json(tmp_path):
    out_json = tmp_path / "bench.json"
    argv = ["benchmark", "--quick", "--section-um", "300", "--genes", "3", "--models", "pixnet", "--bin-size", "55"]
    rc, out, err = _run([*argv, "--json", str(out_json), "-q"])
    assert rc == 0, err
    record = json.loads(out_json.read_text())
    assert record["settings"]["models"] == ["pixnet"]
    rows = {(r["evaluation"], r["metric"]): r["value"] for r in record["results"] if r["model"] == "pixnet"}
    assert -1.0 <= rows["ground-truth density", "pcc_m"] <= 1.0
    assert -1.0 <= rows["measured 55 um spots", "pcc_m"] <= 1.0
    assert f"{rows['ground-truth density', 'pcc_m']:.3f}" in out
    assert "pixnet" in out
    rc, _, err = _run(["benchmark", "--models", "pixnet,unicorn"])
    assert rc == 2
    assert "pixnet, embedding_ridge" in err


def test_installed_entry_point_exits_2_on_a_missing_store(tmp_path):
    exe = Path(sys.executable).with_name("stpredict")
    command = [str(exe)] if exe.exists() else [shutil.which("stpredict") or "stpredict"]
    proc = subprocess.run(
        [*command, "evaluate", str(tmp_path / "missing.zarr"), "--pred", "a", "--truth", "b"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().startswith("stpredict evaluate: error: SDATA: no SpatialData store at")
