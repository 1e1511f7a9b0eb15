"""Output folders: stpredict deletes nothing it did not write, and a failed run leaves the earlier output as it was."""

from __future__ import annotations

import json
import os

import pytest

from stpredict._outputs import MARKER_NAME, OutputFolderError, check_output_folder, output_folder
from stpredict._version import __version__

WRITER = "stpredict test"


def _listing(folder):
    """Every path below ``folder`` (relative) with the bytes of each file: what a user would lose."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def _write_output(stage, text="new"):
    (stage / "metrics.csv").write_text(text)
    (stage / "model").mkdir()
    (stage / "model" / "config.json").write_text("{}")


def _earlier_output(folder, text="old"):
    """A folder as an earlier successful run leaves it."""
    with output_folder(folder, written_by=WRITER) as stage:
        _write_output(stage, text)
        (stage / "old_only.txt").write_text("written by the earlier run only")


def _failing_run(folder, error, *, halfway):
    with output_folder(folder, written_by=WRITER) as stage:
        if halfway:
            (stage / "metrics.csv").write_text("half")
            (stage / "model").mkdir()
        raise error


def test_a_new_folder_is_created_with_the_marker_and_the_output(tmp_path):
    out = tmp_path / "a" / "out"
    with output_folder(out, written_by=WRITER) as stage:
        assert stage.parent == out  # staged inside the folder, out of sight
        _write_output(stage)
    assert sorted(os.listdir(out)) == [MARKER_NAME, "metrics.csv", "model"]
    assert json.loads((out / MARKER_NAME).read_text()) == {
        "written_by": WRITER,
        "version": __version__,
        "entries": ["metrics.csv", "model"],
    }
    assert (out / "metrics.csv").read_text() == "new"
    assert (out / "model" / "config.json").read_text() == "{}"


def test_a_folder_holding_a_users_file_is_refused_and_left_as_it_was(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    (out / "data").mkdir()
    (out / "data" / "counts.csv").write_text("1,2,3")
    before = _listing(out)

    with pytest.raises(OutputFolderError) as err, output_folder(out, written_by=WRITER, option="--out") as stage:
        _write_output(stage)  # pragma: no cover - never reached
    msg = str(err.value)
    assert str(out) in msg
    assert "data, notes.txt" in msg
    assert "another --out" in msg
    assert "remove" in msg
    assert "\n" not in msg
    assert _listing(out) == before
    with pytest.raises(OutputFolderError):
        check_output_folder(out)


def test_the_refusal_names_a_few_entries_and_counts_the_rest(tmp_path):
    for i in range(8):
        (tmp_path / f"f{i}.txt").write_text(str(i))
    with pytest.raises(OutputFolderError, match=r"holds f0\.txt, f1\.txt, f2\.txt, f3\.txt, f4\.txt and 3 more"):
        check_output_folder(tmp_path)


def test_the_working_directory_is_refused_when_it_holds_anything(tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("my notes")
    monkeypatch.chdir(tmp_path)
    with (
        pytest.raises(OutputFolderError, match=r"'\.' already holds notes\.txt"),
        output_folder(".", written_by=WRITER),
    ):
        pass  # pragma: no cover - never reached
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]


def test_an_empty_folder_is_used_in_place(tmp_path, monkeypatch):
    out = tmp_path / "empty"
    out.mkdir()
    inode = out.stat().st_ino
    with output_folder(out, written_by=WRITER) as stage:
        _write_output(stage)
    assert out.stat().st_ino == inode  # filled, not replaced: links, permissions and a shell's cwd stay valid
    assert sorted(os.listdir(out)) == [MARKER_NAME, "metrics.csv", "model"]

    cwd = tmp_path / "cwd"  # an empty working directory is used the same way
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    with output_folder(".", written_by=WRITER) as stage:
        _write_output(stage)
    assert sorted(os.listdir(cwd)) == [MARKER_NAME, "metrics.csv", "model"]


def test_an_earlier_output_is_replaced(tmp_path):
    out = tmp_path / "out"
    _earlier_output(out)
    with output_folder(out, written_by=WRITER) as stage:
        _write_output(stage, "second")
    assert sorted(os.listdir(out)) == [MARKER_NAME, "metrics.csv", "model"]  # old_only.txt went with the old output
    assert (out / "metrics.csv").read_text() == "second"
    assert json.loads((out / MARKER_NAME).read_text())["entries"] == ["metrics.csv", "model"]


def test_an_earlier_output_with_a_users_file_added_is_refused(tmp_path):
    out = tmp_path / "out"
    _earlier_output(out)
    (out / "notes.txt").write_text("my notes")
    before = _listing(out)
    with pytest.raises(OutputFolderError, match=r"earlier output of stpredict test, but also notes\.txt"):
        check_output_folder(out)
    with pytest.raises(OutputFolderError, match=r"but also notes\.txt"), output_folder(out, written_by=WRITER):
        pass  # pragma: no cover - never reached
    assert _listing(out) == before


def test_overwrite_false_refuses_an_earlier_output(tmp_path):
    out = tmp_path / "out"
    _earlier_output(out)
    before = _listing(out)
    with (
        pytest.raises(OutputFolderError, match=r"overwrite=True"),
        output_folder(out, written_by=WRITER, overwrite=False),
    ):
        pass  # pragma: no cover - never reached
    assert _listing(out) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    with output_folder(empty, written_by=WRITER, overwrite=False) as stage:  # an empty folder holds nothing to lose
        _write_output(stage)
    assert (empty / "metrics.csv").read_text() == "new"


@pytest.mark.parametrize("when", ["first write", "halfway"])
def test_a_run_that_fails_leaves_the_earlier_output_as_it_was(tmp_path, when):
    out = tmp_path / "out"
    _earlier_output(out)
    before = _listing(out)
    with pytest.raises(RuntimeError, match="boom"):
        _failing_run(out, RuntimeError("boom"), halfway=when == "halfway")
    assert _listing(out) == before  # no staging folder left behind either


def test_a_run_that_fails_removes_only_the_folders_it_created(tmp_path):
    new = tmp_path / "a" / "b"
    with pytest.raises(KeyboardInterrupt):
        _failing_run(new, KeyboardInterrupt(), halfway=True)
    assert os.listdir(tmp_path) == []

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RuntimeError):
        _failing_run(empty, RuntimeError(), halfway=True)
    assert empty.is_dir()
    assert os.listdir(empty) == []


def test_leftovers_of_a_killed_run_do_not_block_the_next_one(tmp_path):
    out = tmp_path / "out"
    _earlier_output(out)
    (out / ".stpredict-new-x1y2").mkdir()  # what a killed run leaves: its staging folder, half written
    (out / ".stpredict-new-x1y2" / "metrics.csv").write_text("half")
    with output_folder(out, written_by=WRITER) as stage:
        _write_output(stage, "third")
    assert sorted(os.listdir(out)) == [MARKER_NAME, "metrics.csv", "model"]
    assert (out / "metrics.csv").read_text() == "third"


def test_a_file_a_damaged_marker_and_a_foreign_marker_are_refused(tmp_path):
    a_file = tmp_path / "out.txt"
    a_file.write_text("not a folder")
    with pytest.raises(OutputFolderError, match="is a file"):
        check_output_folder(a_file)
    assert a_file.read_text() == "not a folder"

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / MARKER_NAME).write_text("{not json")
    (damaged / "metrics.csv").write_text("x")
    with pytest.raises(OutputFolderError, match="cannot be read"):
        check_output_folder(damaged)

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / MARKER_NAME).write_text(json.dumps({"written_by": "someone else", "entries": ["metrics.csv"]}))
    (foreign / "metrics.csv").write_text("x")
    with pytest.raises(OutputFolderError, match="cannot be read"):
        check_output_folder(foreign)
    assert sorted(os.listdir(foreign)) == [MARKER_NAME, "metrics.csv"]


def test_a_file_that_appears_during_the_run_is_kept_and_so_is_the_new_output(tmp_path):
    out = tmp_path / "out"
    _earlier_output(out)

    def run_while_the_user_adds_a_file():
        with output_folder(out, written_by=WRITER) as stage:
            _write_output(stage, "new")
            (out / "notes.txt").write_text("my notes")

    with pytest.raises(OutputFolderError, match=r"notes\.txt appeared") as err:
        run_while_the_user_adds_a_file()
    assert (out / "notes.txt").read_text() == "my notes"
    assert (out / "metrics.csv").read_text() == "old"
    (kept,) = [p for p in out.iterdir() if p.name.startswith(".stpredict-new-")]
    assert str(kept) in str(err.value)
    assert (kept / "metrics.csv").read_text() == "new"
