"""Pages that ``docs/conf.py`` writes before Sphinx reads the sources: the tutorials and the benchmark results.

- :func:`write_tutorials` converts ``tutorials/*.md`` (jupytext markdown) into notebooks in ``docs/tutorials/``
  with an index page; myst-nb executes them during the build.
- :func:`write_benchmarks` turns every ``benchmarks/results/*.json`` into tables and plots in one markdown file
  that ``docs/benchmarks.md`` includes, naming the machine each run recorded.

Both only rewrite a file whose content changes, so incremental builds stay incremental.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["NAMESPACES", "api_names", "render_benchmark", "write_api", "write_benchmarks", "write_tutorials"]

#: Public namespaces of ``stpredict`` documented on the API page, in the page's order.
NAMESPACES = ("io", "datasets", "pp", "models", "tl", "pl", "errors")

#: Result files → the script that writes them (matched by the longest prefix of the file name).
SCRIPTS = {
    "aggregate": "bench_aggregate.py",
    "load": "bench_load.py",
    "magnet": "bench_magnet.py",
    "models": "bench_models.py",
    "predict_dense": "bench_predict_dense.py",
    "predict_dense_resume": "bench_predict_dense_resume.py",
    "fit_throughput": "bench_fit_throughput.py",
    "protocol": "bench_protocol.py",
    "recipe": "bench_recipe.py",
}
#: Metric columns of result rows, in display order, with their labels (SPEC §1.4).
METRICS = {
    "pcc_m": "PCC@M",
    "pcc_s": "PCC@S",
    "pcc_f": "PCC@F",
    "spot_pcc": "spot-wise PCC",
    "mse": "MSE",
    "mae": "MAE",
    "n_bins": "units",
    "n_units": "units",
}
#: Keys left out of the flat tables: long lists, repeated per-gene values, and what the row tables already show.
SKIP = {"rows", "per_gene_pcc", "genes", "table", "args", "command", "machine", "partial"}
MAX_FLAT = 60
MAX_TIMINGS = 24


# ---------------------------------------------------------------------------------------------- helpers
def _write_if_changed(path: Path, text: str | bytes) -> None:
    data = text.encode() if isinstance(text, str) else text
    if not path.is_file() or path.read_bytes() != data:
        path.write_bytes(data)


def _cell(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        text = str(value)
    elif isinstance(value, float):
        text = "NaN" if math.isnan(value) else f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    elif isinstance(value, list | tuple):
        text = ", ".join(_cell(v) for v in value)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return [*out, ""]


def _flatten(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Scalar leaves (and short lists of scalars) of a JSON object, with dotted keys."""
    if isinstance(obj, dict):
        out = []
        for key, value in obj.items():
            if key in SKIP:
                continue
            out += _flatten(value, f"{prefix}.{key}" if prefix else str(key))
        return out
    if isinstance(obj, list):
        if all(not isinstance(v, dict | list) for v in obj):
            return [(prefix, obj)] if len(obj) <= 6 else [(prefix, f"{len(obj)} values")]
        out = []
        for i, value in enumerate(obj):
            out += _flatten(value, f"{prefix}[{i}]")
        return out
    return [(prefix, obj)]


def script_for(stem: str) -> str | None:
    """The benchmark script that writes ``benchmarks/results/<stem>.json``."""
    matches = [prefix for prefix in SCRIPTS if stem == prefix or stem.startswith(prefix + "_")]
    return SCRIPTS[max(matches, key=len)] if matches else None


def describe_machine(data: dict[str, Any]) -> str:
    """The machine a result file records, in words (or that it records none)."""
    machine = data.get("machine")
    if machine is None:
        return "not recorded in this file" + (" (a partial run)" if data.get("partial") else "")
    if not isinstance(machine, dict):
        return str(machine)
    parts = [str(machine["platform"])] if "platform" in machine else []
    if "cpus" in machine:
        usable = machine.get("usable_cores", machine.get("usable_cpus"))
        shown = f" ({usable} usable)" if usable not in (None, machine["cpus"]) else ""
        parts.append(f"{machine['cpus']} CPUs{shown}")
    for key, label in (("python", "Python"), ("torch", "torch"), ("torch_threads", "torch threads")):
        if key in machine:
            parts.append(f"{label} {machine[key]}")
    for key in ("load_average_before", "load_avg_at_end"):
        if key in machine:
            loads = machine[key]
            parts.append(f"load average {_cell(loads[0] if isinstance(loads, list) else loads)} ({key})")
    rest = {k: v for k, v in machine.items() if k not in {"platform", "cpus", "usable_cores", "usable_cpus",
                                                           "python", "torch", "torch_threads",
                                                           "load_average_before", "load_avg_at_end"}}  # fmt: skip
    parts += [f"{k} {_cell(v)}" for k, v in rest.items()]
    return ", ".join(parts)


def result_rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of per-model metrics: ``rows`` at the top level or in each ``per_seed`` entry."""
    rows = data.get("rows") if isinstance(data.get("rows"), list) else []
    for seed in data.get("per_seed", []) if isinstance(data.get("per_seed"), list) else []:
        if isinstance(seed, dict) and isinstance(seed.get("rows"), list):
            rows = [*rows, *seed["rows"]]
    return [r for r in rows if isinstance(r, dict) and any(m in r for m in METRICS)]


# ---------------------------------------------------------------------------------------------- plots
def _plot_metric(rows: list[dict[str, Any]], path: Path, metric: str) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if isinstance(r.get(metric), int | float) and "model" in r]
    if not rows:
        return False
    keys = [k for k in rows[0] if k not in METRICS and k not in {"model", "seed"}]
    groups: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        group = ", ".join(f"{k} {row.get(k)}" for k in keys) or "all"
        groups.setdefault(group, {}).setdefault(str(row["model"]), []).append(float(row[metric]))
    models = list(dict.fromkeys(str(r["model"]) for r in rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(groups) * len(models) / 2 + 3), 3.6), layout="constrained")
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        values = [sum(g[model]) / len(g[model]) if model in g else float("nan") for g in groups.values()]
        ax.bar([j + i * width for j in range(len(groups))], values, width, label=model)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], list(groups), rotation=30, ha="right", fontsize=7)
    several = any(len(v) > 1 for g in groups.values() for v in g.values())
    ax.set_ylabel(METRICS.get(metric, metric) + (" (mean over seeds)" if several else ""))
    ax.axhline(0, color="0.3", lw=0.6)
    ax.legend(fontsize=7, ncols=min(len(models), 5), loc="upper left", bbox_to_anchor=(0, 1.18), frameon=False)
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
    return True


def _plot_timings(timings: list[tuple[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 0.28 * len(timings) + 1.0), layout="constrained")
    ax.barh(range(len(timings)), [t for _, t in timings], color="tab:gray")
    ax.set_yticks(range(len(timings)), [k for k, _ in timings], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- pages
def render_benchmark(path: Path, out_dir: Path, *, image_prefix: str = "") -> list[str]:
    """Markdown lines for one result file; plots are written into ``out_dir`` and linked as ``image_prefix + name``.

    Parameters
    ----------
    path
        A ``benchmarks/results/*.json`` file.
    out_dir
        Folder for the plots.
    image_prefix
        Path from the including page to ``out_dir`` (with a trailing ``/``).

    Returns
    -------
    The section's lines: heading, script, machine, metric table and plot, timing plot, remaining values.
    """
    stem = path.stem
    lines = [f"## `{path.name}`", ""]
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return [*lines, f"This file could not be read ({type(err).__name__}: {err}).", ""]
    if not isinstance(data, dict):
        return [*lines, "This file does not hold a JSON object; nothing to show.", ""]
    script = script_for(stem)
    if script:
        lines += [f"Written by `benchmarks/{script}`" + (f" (`{data['command']}`)." if "command" in data else "."), ""]
    lines += [f"**Machine:** {describe_machine(data)}.", ""]
    if data.get("partial"):
        lines += ["This is a **partial** result: the run stopped early or is still going; models may be missing.", ""]

    rows = result_rows(data)
    if rows:
        first = [k for k in rows[0] if k not in METRICS and k != "seed"]
        if len({r.get("seed") for r in rows}) > 1:
            first.append("seed")
        metrics = [m for m in METRICS if any(m in r for r in rows)]
        lines += ["### Metrics", ""]
        lines += _table(first + [METRICS[m] for m in metrics], [[r.get(k, "") for k in first + metrics] for r in rows])
        metric = next((m for m in ("pcc_m", "spot_pcc") if m in metrics), None)
        if metric and _plot_metric(rows, out_dir / f"{stem}_{metric}.png", metric):
            lines += [f"![{METRICS[metric]} by model, {stem}]({image_prefix}{stem}_{metric}.png)", ""]

    flat = [(k, v) for k, v in _flatten(data) if not k.startswith("config")]
    timings = [(k, float(v)) for k, v in flat if isinstance(v, int | float) and not isinstance(v, bool)
               and k.rsplit(".", 1)[-1].endswith("_s") and math.isfinite(v)]  # fmt: skip
    if 2 <= len(timings) <= MAX_TIMINGS:
        _plot_timings(timings, out_dir / f"{stem}_timings.png")
        lines += ["### Timings", "", f"![timings, {stem}]({image_prefix}{stem}_timings.png)", ""]
    if flat:
        lines += ["### Values", ""]
        shown = flat[:MAX_FLAT]
        lines += _table(["key", "value"], [list(kv) for kv in shown])
        if len(flat) > MAX_FLAT:
            lines += [f"… and {len(flat) - MAX_FLAT} more values in the file.", ""]
    config = _flatten(data.get("config", {}))
    if config:
        lines += ["### Configuration", ""]
        lines += _table(["key", "value"], [list(kv) for kv in config[:MAX_FLAT]])
    return lines


def write_benchmarks(results_dir: Path, out_dir: Path) -> Path:
    """Write ``out_dir/results.md`` (and its plots) from every ``*.json`` in ``results_dir``.

    Parameters
    ----------
    results_dir
        ``benchmarks/results``; missing or empty gives a page that says so.
    out_dir
        Where the page and plots go (``docs/generated/benchmarks``, git-ignored).

    Returns
    -------
    The path of the markdown file.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    files = sorted(Path(results_dir).glob("*.json")) if Path(results_dir).is_dir() else []
    for old in out_dir.glob("*.png"):  # every build draws the plots afresh
        old.unlink()
    lines = [
        f"*Generated when these pages were built, from the {len(files)} file(s) in `benchmarks/results/`.*",
        "",
    ]
    if not files:
        lines += [
            "No benchmark results are in this checkout: `benchmarks/results/*.json` are git-ignored, so they exist "
            "only where a benchmark ran. Run a script of `benchmarks/` (the commands are in `benchmarks/README.md`) "
            "and rebuild these pages to see its tables here.",
            "",
        ]
    for path in files:
        lines += render_benchmark(path, out_dir, image_prefix="generated/benchmarks/")
    page = out_dir / "results.md"
    _write_if_changed(page, "\n".join(lines).rstrip() + "\n")
    return page


def api_names(namespace: str) -> list[str]:
    """The public names of ``stpredict.<namespace>`` (its ``__all__``), sorted; each must resolve.

    The subpackages attach their names lazily (lazy_loader), so a name in ``__all__`` whose module lacks it would only
    fail when used; resolving every one here makes the documentation build fail instead.
    """
    import importlib

    module = importlib.import_module(f"stpredict.{namespace}")
    names = sorted(module.__all__)
    for name in names:
        getattr(module, name)  # raises AttributeError / ImportError for a name that does not resolve
    return names


def write_api(out_dir: Path) -> list[Path]:
    """Write an autosummary block per namespace, ``out_dir/_api_<namespace>.md``, listing every name of its ``__all__``.

    ``docs/api.md`` includes them, so the API reference always lists exactly the public names. They sit beside
    ``api.md`` because autosummary resolves ``:toctree:`` against the folder of the file it scans.

    Parameters
    ----------
    out_dir
        ``docs`` (the files are git-ignored).

    Returns
    -------
    The files written, in :data:`NAMESPACES` order.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for namespace in NAMESPACES:
        lines = ["```{eval-rst}", ".. currentmodule:: stpredict", "", ".. autosummary::", "   :toctree: generated", ""]
        lines += [f"   {namespace}.{name}" for name in api_names(namespace)]
        path = out_dir / f"_api_{namespace}.md"
        _write_if_changed(path, "\n".join([*lines, "```", ""]))
        written.append(path)
    return written


def write_tutorials(src: Path, dst: Path) -> list[Path]:
    """Convert the jupytext markdown tutorials in ``src`` into notebooks in ``dst``, with ``dst/index.md``.

    Parameters
    ----------
    src
        ``tutorials/``: ``*.md`` in jupytext's markdown format.
    dst
        ``docs/tutorials/`` (git-ignored); notebooks of tutorials that no longer exist are removed.

    Returns
    -------
    The notebooks written, in name order.
    """
    import jupytext

    dst.mkdir(parents=True, exist_ok=True)
    sources = sorted(Path(src).glob("*.md")) if Path(src).is_dir() else []
    written = []
    for md in sources:
        notebook = jupytext.read(md)
        notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        notebook.metadata.pop("jupytext", None)
        target = dst / f"{md.stem}.ipynb"
        _write_if_changed(target, jupytext.writes(notebook, fmt="ipynb"))
        written.append(target)
    for old in dst.glob("*.ipynb"):
        if old not in written:
            old.unlink()
    index = [
        "# Tutorials",
        "",
        "Each tutorial is a notebook kept as jupytext markdown in `tutorials/` of the repository and run on built-in "
        "synthetic data, so it needs no download. The documentation build executes every one of them (CI fails when "
        "a cell fails); open one as a notebook with `jupytext --to ipynb tutorials/<name>.md`.",
        "",
        "```{toctree}",
        ":maxdepth: 1",
        "",
        *[p.stem for p in written],
        "```",
        "",
    ]
    _write_if_changed(dst / "index.md", "\n".join(index))
    return written
