"""``stpredict train --config``: model and fit options from a YAML or TOML file, checked against the model's API."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stpredict._errors import InputError

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["SECTIONS", "check_options", "model_options", "read_config"]

#: The sections a config file may have.
SECTIONS = ("model", "fit")

#: Options the command line sets itself (from its arguments), so a config file may not.
_SET_BY_COMMAND = {
    "model": {"genes"},
    "fit": {"data", "model", "validation_data", "genes", "show_progress_bar", "callbacks"},
}


def read_config(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read ``path`` (``.yaml``/``.yml`` or ``.toml``) into ``{"model": {...}, "fit": {...}}``.

    Parameters
    ----------
    path
        The config file; its suffix chooses the parser.

    Returns
    -------
    Both sections, empty where the file has none.

    Raises
    ------
    InputError
        The file is missing, unparsable, not a mapping, or has sections other than :data:`SECTIONS`.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"--config: no file at {str(path)!r}; check the path."
        raise InputError(msg)
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    try:
        if suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            msg = f"--config: {str(path)!r} is neither YAML (.yaml, .yml) nor TOML (.toml); rename it or convert it."
            raise InputError(msg)
    except InputError:
        raise
    except Exception as err:  # yaml.YAMLError, tomllib.TOMLDecodeError: the parser's message says where
        msg = f"--config: {str(path)!r} cannot be parsed: {' '.join(str(err).split())}"
        raise InputError(msg) from err
    data = {} if data is None else data
    if not isinstance(data, dict):
        msg = (
            f"--config: {str(path)!r} must hold a mapping with sections {', '.join(SECTIONS)}; it holds a "
            f"{type(data).__name__}."
        )
        raise InputError(msg)
    unknown = sorted(str(k) for k in data if k not in SECTIONS)
    if unknown:
        msg = (
            f"--config: unknown section(s) {', '.join(unknown)} in {str(path)!r}; valid sections: "
            f"{', '.join(SECTIONS)} (model options under `model:`, training options under `fit:`)."
        )
        raise InputError(msg)
    config = {}
    for section in SECTIONS:
        value = data.get(section) or {}
        if not isinstance(value, dict):
            msg = f"--config: section {section!r} of {str(path)!r} must be a mapping of option: value."
            raise InputError(msg)
        config[section] = {str(k): v for k, v in value.items()}
    return config


def model_options(model_name: str) -> tuple[type, Callable[..., Any]]:
    """The model class and the function whose keyword arguments are its ``fit`` options."""
    import stpredict as st

    if model_name == "magnet":
        from stpredict.models._magnet._fit import fit_magnet

        return st.models.MagNet, fit_magnet
    from stpredict.models._training._fit import fit

    return st.models.PixNet, fit


def _parameters(func: Callable[..., Any]) -> list[str]:
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return [p.name for p in inspect.signature(func).parameters.values() if p.kind not in variadic and p.name != "self"]


def check_options(section: str, options: dict[str, Any], func: Callable[..., Any], *, model_name: str) -> None:
    """Refuse options of ``section`` that ``func`` does not take, naming the valid ones.

    Parameters
    ----------
    section
        ``"model"`` or ``"fit"``.
    options
        The section's options.
    func
        The model class (its constructor) or the fit function.
    model_name
        For the message.
    """
    names = [
        n for n in _parameters(func.__init__ if isinstance(func, type) else func) if n not in _SET_BY_COMMAND[section]
    ]
    own = sorted(set(options) & _SET_BY_COMMAND[section])
    if own:
        msg = (
            f"--config: {', '.join(own)} in section {section!r} is set by the command line (the stores, --genes, "
            f"--validation, --quiet), not by the config file; remove it from the file."
        )
        raise InputError(msg)
    unknown = sorted(set(options) - set(names))
    if unknown:
        msg = (
            f"--config: unknown {section} option(s) {', '.join(unknown)} for --model {model_name}; valid "
            f"{section} options: {', '.join(names)}."
        )
        raise InputError(msg)
