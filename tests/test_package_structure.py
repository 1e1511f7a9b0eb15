"""The shape of the package: file sizes, one-way imports, and the conventions of every public signature.

scanpy's ``tests/test_package_structure.py`` checks its signatures the same way; here the rules are
stpredict's (docs/usage-principles.md): data first, at most one element key after it, everything else
keyword-only, one name per concept, and a numpydoc docstring that documents every parameter.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from pathlib import Path

import pytest

import stpredict as st

SRC = Path(st.__file__).parent
MAX_LINES = 600

#: Import layers, bottom first: a module may import from its own layer or below, never from above.
LAYERS = {
    "stpredict._elements": 0,
    "stpredict._errors": 0,
    "stpredict._geometry": 0,
    "stpredict._grid": 0,
    "stpredict._keys": 0,
    "stpredict._logging": 0,
    "stpredict._meta": 0,
    "stpredict._outputs": 0,
    "stpredict._settings": 0,
    "stpredict._validation": 0,
    "stpredict._version": 0,
    "stpredict.io": 1,
    "stpredict.kernels": 1,
    "stpredict.datasets": 2,
    "stpredict.pp": 2,
    "stpredict.models": 3,
    "stpredict.tl": 4,
    "stpredict.pl": 5,
    "stpredict._demo": 6,
    "stpredict.cli": 6,
    "stpredict": 6,  # the package root: only the application layer (cli, demo) uses the API through it
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return LAYERS[prefix]
    msg = f"{module} has no layer: add its top-level name to LAYERS"
    raise AssertionError(msg)


def _is_module(name: str) -> bool:
    return SRC.parent.joinpath(*name.split(".")).with_suffix(".py").is_file()


def _imports() -> list[tuple[str, str, int]]:
    """Every import of a stpredict module, function-local ones included: ``(importer, imported, line)``."""
    edges = []
    for path in SRC.rglob("*.py"):
        module = _module_name(path)
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join([*base, node.module] if node.module else base)
                else:
                    target = node.module or ""
                # ``from . import _kernels`` imports a module; ``from .kernels import rect_sum`` a name of one
                targets = [f"{target}.{a.name}" if _is_module(f"{target}.{a.name}") else target for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            edges += [(module, t, node.lineno) for t in targets if t == "stpredict" or t.startswith("stpredict.")]
    return edges


def test_no_source_file_over_600_lines():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these modules along their jobs: {long}"


def test_imports_point_down_the_layers():
    upward = [
        f"{a}:{line} imports {b}"
        for a, b, line in _imports()
        if _layer(b) > _layer(a) and not (a == "stpredict" and b.startswith("stpredict."))
    ]
    assert not upward, "imports against the layering (io/kernels → pp → models → tl → pl → cli):\n" + "\n".join(upward)


def test_import_graph_has_no_cycle():
    # Package __init__ files only name what their modules define (lazily); an edge into a package means its
    # modules, so the graph is over modules, with a package standing for all modules below it.
    modules = {_module_name(p) for p in SRC.rglob("*.py") if p.name != "__init__.py"}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for a, b, _ in _imports():
        if a not in modules or b == "stpredict":  # the root names packages lazily; cli and demo use it as users do
            continue
        graph[a] |= {m for m in modules if m == b or m.startswith(b + ".")} - {a}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for succ in graph[node]:
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert not cycles, f"import cycles: {cycles}"


# --- public signatures -----------------------------------------------------------------------------------------

SUBPACKAGES = ("io", "pp", "tl", "pl", "datasets", "models")
#: Names a leading positional argument (the data) may have.
DATA_NAMES = {
    "sdata", "adata", "data", "pred", "truth", "path", "values", "result", "table", "fold_results", "image", "tiles",
    "crops", "results", "model_or_history",
}  # fmt: skip
#: A second positional argument: the counterpart of the data, or the one element key.
SECOND_NAMES = {"truth", "model", "adata", "genes"}
#: The element keys of the API: one name per concept (the dense map is ``map_key``, the H&E ``image_key``).
ELEMENT_KEYS = {
    "image_key",
    "map_key",
    "truth_map_key",
    "table_key",
    "shapes_key",
    "labels_key",
    "tissue_key",
    "source_image_key",
    "patient_key",
    "section_key",
    "spatial_key",
    "x_key",
    "y_key",
    "key_added",
}
#: Names that an earlier version used for a concept that now has one name.
RETIRED = {
    "n": "n_top",
    "hpg": "highly_predictive_genes",
    "he_image": "source_image_key or image_file",
    "fullres_image_file": "image_file",
}
PLOT_RETURNS = ("Figure | None", "Axes | None")


def _public_callables():
    for sub in SUBPACKAGES:
        module = getattr(st, sub)
        for name in module.__all__:
            obj = getattr(module, name)
            qualname = f"st.{sub}.{name}"
            if inspect.isclass(obj):
                if getattr(obj, "_is_protocol", False):
                    continue
                if dataclasses.is_dataclass(obj):  # a result record, made by the library: only its methods
                    for attr, member in vars(obj).items():
                        if not attr.startswith("_") and inspect.isfunction(member):
                            yield f"{qualname}.{attr}", member, False
                    continue
                if "__init__" in vars(obj) or any("__init__" in vars(base) for base in obj.__mro__[1:-1]):
                    yield qualname, obj, True
                inherited = {}
                for klass in reversed(obj.__mro__[:-1]):  # public methods, inherited ones included
                    inherited |= {
                        a: m for a, m in vars(klass).items() if not a.startswith("_") and inspect.isfunction(m)
                    }
                for attr, member in sorted(inherited.items()):
                    yield f"{qualname}.{attr}", member, False
            elif callable(obj):
                yield qualname, obj, False


CALLABLES = sorted(_public_callables(), key=lambda item: item[0])


def _params(obj, is_class: bool) -> list[inspect.Parameter]:
    sig = inspect.signature(obj)
    return [p for p in sig.parameters.values() if p.name not in ("self", "cls")]


def _documented(doc: str) -> set[str]:
    """Parameter names listed in the numpydoc ``Parameters`` section (``a, b`` and ``a : type`` forms)."""
    doc = inspect.cleandoc(doc)
    match = re.search(r"^Parameters\n-{3,}\n(.*?)(?:\n\n[A-Z][A-Za-z ]+\n-{3,}\n|\Z)", doc, re.S | re.M)
    if match is None:
        return set()
    names: set[str] = set()
    for line in match.group(1).splitlines():
        if line and not line.startswith(" "):
            head = line.split(" : ")[0]
            names |= {n.strip().lstrip("*") for n in head.split(",")}
    return names


@pytest.mark.parametrize(("qualname", "obj", "is_class"), CALLABLES, ids=[c[0] for c in CALLABLES])
def test_signature_conventions(qualname, obj, is_class):
    params = _params(obj, is_class)
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = [p.name for p in params]
    problems = []
    allowed = [{"genes"}] if is_class else [DATA_NAMES, SECOND_NAMES | {n for n in ELEMENT_KEYS if n != "key_added"}]
    if len(positional) > len(allowed):
        problems.append(f"at most {len(allowed)} positional parameters, got {[p.name for p in positional]}")
    for p, ok in zip(positional, allowed, strict=False):
        if p.name not in ok:
            problems.append(f"positional parameter {p.name!r} should be keyword-only (or be named one of {sorted(ok)})")
    for name in names:
        if name in RETIRED:
            problems.append(f"parameter {name!r} is now called {RETIRED[name]}")
        if name.endswith("_key") and name not in ELEMENT_KEYS:
            problems.append(f"element key {name!r} is not in the agreed vocabulary {sorted(ELEMENT_KEYS)}")
    by_name = {p.name: p for p in params}
    if "inplace" in by_name and "copy" in by_name:
        problems.append("takes both inplace and copy")
    if "inplace" in by_name and by_name["inplace"].default is not True:
        problems.append("writers default to inplace=True")
    if "copy" in by_name and by_name["copy"].default is not False:
        problems.append("copy defaults to False")
    if qualname.startswith("st.pl."):
        problems += [
            f"plot functions take {name}=None (scanpy's convention)"
            for name in ("show", "save")
            if name not in by_name or by_name[name].default is not None
        ]
        if str(inspect.signature(obj).return_annotation) not in PLOT_RETURNS:
            problems.append(f"plot functions return one of {PLOT_RETURNS} (None when shown)")
    if not is_class and str(inspect.signature(obj).return_annotation) in ("Any", "typing.Any"):
        problems.append("the return type is Any: name what it returns")
    doc = inspect.getdoc(obj) or ""
    if not doc.strip():
        problems.append("no docstring")
    documented = _documented(doc)
    undocumented = [n for n in names if n not in documented]
    if undocumented:
        problems.append(f"parameters missing from the numpydoc Parameters section: {undocumented}")
    assert not problems, f"{qualname}{inspect.signature(obj)}:\n  " + "\n  ".join(problems)


def test_convention_check_sees_the_whole_api():
    seen = {name for name, _, _ in CALLABLES}
    assert {"st.tl.aggregate", "st.tl.predict_dense", "st.pp.normalize", "st.pl.gene_map", "st.io.read_st"} <= seen
    assert "st.models.PixNet" in seen
    assert "st.models.PixNet.fit" in seen
    assert len(seen) > 35
