"""Write docs/api.md from the package itself: every public name, its signature and the first line of its docstring.

Run ``python docs/make_api.py`` after changing the public API; ``tests/test_docs.py`` fails while the committed page
differs from what this script writes, so the page never names an argument the code no longer has.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
from pathlib import Path

import stpredict as st

SUBPACKAGES = ("io", "datasets", "pp", "models", "tl", "pl")
PAGE = Path(__file__).with_name("api.md")


def _summary(obj: object) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().split("\n\n")[0].replace("\n", " ")


def _signature(obj: object) -> str:
    """The call signature without annotations: names, defaults and the ``*`` before keyword-only options."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return ""
    params = [p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values() if p.name != "self"]
    text = str(sig.replace(parameters=params, return_annotation=inspect.Signature.empty))
    return re.sub(r"<factory>|<function [^>]*>", "...", text)


def _entry(qualname: str, obj: object) -> list[str]:
    if inspect.isclass(obj) and dataclasses.is_dataclass(obj):
        return [f"- `{qualname}`: {_summary(obj)}"]
    lines = [f"- `{qualname}{_signature(obj)}`: {_summary(obj)}"]
    if inspect.isclass(obj) and not getattr(obj, "_is_protocol", False):
        methods = {}
        for klass in reversed(obj.__mro__[:-1]):  # inherited methods too (the baselines share theirs)
            methods |= {a: m for a, m in vars(klass).items() if inspect.isfunction(m) and a[0] != "_"}
        lines += [f"  - `.{a}{_signature(m)}`: {_summary(m)}" for a, m in sorted(methods.items())]
    return lines


def render() -> str:
    """The text of docs/api.md."""
    out = [
        "# API",
        "",
        "`import stpredict as st`. Every name below has a numpydoc docstring: `help(st.tl.aggregate)`. The data comes",
        "first, then at most one element key; options after `*` are keyword-only (see `usage-principles.md`).",
        "This page is written by `docs/make_api.py`.",
    ]
    for sub in SUBPACKAGES:
        module = getattr(st, sub)
        out += ["", f"## `st.{sub}`", ""]
        for name in sorted(module.__all__):
            out += _entry(f"st.{sub}.{name}", getattr(module, name))
    out += ["", "## `st.settings`", "", _summary(type(st.settings)), ""]
    out += [f"- `st.settings.{f.name}` (default `{f.default!r}`)" for f in dataclasses.fields(st.settings)]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    PAGE.write_text(render())
    sys.stdout.write(f"wrote {PAGE}\n")
