"""Checkpoints: ``config.json`` + ``weights.safetensors``, written atomically and read without unpickling.

Any model class that wants ``model.save`` / :func:`stpredict.models.load` registers itself with
:func:`register_model` and implements two methods:

``_checkpoint_state(self) -> tuple[dict, dict[str, torch.Tensor]]``
    JSON-serialisable configuration (everything needed to rebuild the object) and its tensors.
``_from_checkpoint_state(cls, config: dict, tensors: dict[str, torch.Tensor]) -> Self`` (classmethod)
    The inverse.

:func:`save_model` and :func:`load` add the envelope (class name, format and library versions) and do the
validation, so model classes never touch files themselves.
"""

from __future__ import annotations

import importlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from stpredict._errors import InputError
from stpredict._logging import get_logger
from stpredict._version import __version__

if TYPE_CHECKING:
    import os
    from collections.abc import Callable

    import torch

    from ._base import DenseModel

__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "WEIGHTS_NAME",
    "load",
    "load_state_dict",
    "register_model",
    "save_model",
]

logger = get_logger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "weights.safetensors"
FORMAT_NAME = "stpredict-model"
#: ``major.minor``: a reader accepts any minor of its own major (and older majors it knows); newer majors are refused.
FORMAT_VERSION = "1.0"
_MAX_CONFIG_BYTES = 64 * 2**20
_REQUIRED_KEYS = ("format", "format_version", "stpredict_version", "class", "config")

#: Where built-in model classes live, so that :func:`load` can import them before dispatching.
_BUILTIN_MODULES = {
    "PixNet": "stpredict.models._pixnet._model",
    "SpotCNN": "stpredict.models._baselines._spotcnn",
    "EmbeddingRidge": "stpredict.models._baselines._embedding_ridge",
}
_REGISTRY: dict[str, type] = {}

T = TypeVar("T", bound=type)


def register_model(name: str | None = None) -> Callable[[T], T]:
    """Class decorator: make a model class loadable by :func:`load` under ``name`` (default: the class name)."""

    def decorate(cls: T) -> T:
        for method in ("_checkpoint_state", "_from_checkpoint_state"):
            if not hasattr(cls, method):
                msg = f"{cls.__name__} must define {method} to be registered as a savable model."
                raise TypeError(msg)
        _REGISTRY[name or cls.__name__] = cls
        return cls

    return decorate


def _library_version() -> str:
    return __version__


def _parse_version(text: object, what: str) -> tuple[int, int]:
    try:
        major, minor = str(text).split(".")[:2]
        return int(major), int(minor)
    except ValueError as err:
        msg = f"Checkpoint {what} {text!r} is not of the form 'major.minor'; the file is not an stpredict checkpoint."
        raise InputError(msg) from err


def save_model(model: Any, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write ``model`` to the folder ``path`` as ``config.json`` + ``weights.safetensors``.

    The folder is written beside its final name and renamed into place, so an interrupted save never leaves
    a half-written checkpoint under ``path``.

    Parameters
    ----------
    model
        An instance of a class decorated with :func:`register_model`.
    path
        Folder to create.
    overwrite
        Replace an existing folder at ``path``.

    Returns
    -------
    The folder written.
    """
    from safetensors.torch import save_file

    cls_name = next((key for key, cls in _REGISTRY.items() if type(model) is cls), None)
    if cls_name is None:
        msg = f"{type(model).__name__} is not a registered model class; decorate it with @register_model()."
        raise TypeError(msg)
    path = Path(path)
    if path.exists() and not overwrite:
        msg = f"{str(path)!r} already exists; pass overwrite=True or choose another folder."
        raise FileExistsError(msg)
    config, tensors = model._checkpoint_state()
    envelope = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "stpredict_version": _library_version(),
        "class": cls_name,
        "config": config,
    }
    text = json.dumps(envelope, indent=2, allow_nan=False)
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in tensors.items()}
    # safetensors refuses tensors that share storage (tied weights, views); give those their own copy
    seen: set[int] = set()
    for key, value in tensors.items():
        ptr = value.untyped_storage().data_ptr()
        if value.numel() and ptr in seen:
            tensors[key] = value.clone()
        seen.add(ptr)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        (tmp / CONFIG_NAME).write_text(text, encoding="utf-8")
        save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt", "stpredict_class": cls_name})
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("saved %s to %s", cls_name, path)
    return path


def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate the ``config.json`` envelope of the checkpoint folder ``path`` (no weights are read)."""
    path = Path(path)
    if path.is_file() and path.name == CONFIG_NAME:
        path = path.parent
    if not path.is_dir():
        msg = (
            f"{str(path)!r} is not a checkpoint folder; pass the folder written by model.save(...), "
            f"which holds {CONFIG_NAME} and {WEIGHTS_NAME}."
        )
        raise InputError(msg)
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        msg = f"{str(path)!r} has no {CONFIG_NAME}; it was not written by model.save(...)."
        raise InputError(msg)
    if config_path.stat().st_size > _MAX_CONFIG_BYTES:
        msg = f"{str(config_path)!r} is larger than {_MAX_CONFIG_BYTES} bytes; it is not an stpredict config."
        raise InputError(msg)
    try:
        envelope = json.loads(config_path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        msg = f"{str(config_path)!r} is not valid JSON ({err}); the checkpoint is corrupt or not from stpredict."
        raise InputError(msg) from err
    if not isinstance(envelope, dict):
        msg = f"{str(config_path)!r} does not hold a JSON object; the checkpoint is not from stpredict."
        raise InputError(msg)
    missing = [key for key in _REQUIRED_KEYS if key not in envelope]
    if missing or envelope.get("format") != FORMAT_NAME:
        msg = (
            f"{str(config_path)!r} is not an stpredict checkpoint config "
            f"(missing keys {missing}, format {envelope.get('format')!r}); save models with model.save(...)."
        )
        raise InputError(msg)
    major, _ = _parse_version(envelope["format_version"], "format version")
    ours, _ = _parse_version(FORMAT_VERSION, "format version")
    if major > ours:
        msg = (
            f"This checkpoint uses format {envelope['format_version']}, written by stpredict "
            f"{envelope['stpredict_version']}; this stpredict ({_library_version()}) reads format {ours}.x. "
            f"Install stpredict>={envelope['stpredict_version']} to load it."
        )
        raise InputError(msg)
    if major < ours:
        msg = (
            f"This checkpoint uses the old format {envelope['format_version']} (stpredict "
            f"{envelope['stpredict_version']}), which this stpredict ({_library_version()}) no longer reads. "
            f"Load it with stpredict=={envelope['stpredict_version']} and re-save it, or retrain."
        )
        raise InputError(msg)
    if not isinstance(envelope["config"], dict) or not isinstance(envelope["class"], str):
        msg = f"{str(config_path)!r} has a malformed 'config' or 'class' entry; the checkpoint is corrupt."
        raise InputError(msg)
    return envelope


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        msg = (
            f"{str(path)!r} is not a readable safetensors file ({err}); the checkpoint is corrupt or foreign. "
            "Checkpoints are never unpickled: re-save the model with model.save(...)."
        )
        raise InputError(msg) from err


def load(path: str | os.PathLike[str]) -> DenseModel:
    """Load a model saved with ``model.save(path)``.

    Parameters
    ----------
    path
        The checkpoint folder (holding ``config.json`` and ``weights.safetensors``).

    Returns
    -------
    The model, an instance of the class that saved it (:class:`~stpredict.models.PixNet`,
    :class:`~stpredict.models.SpotCNN`, :class:`~stpredict.models.EmbeddingRidge` or another class registered with
    :func:`register_model`), so a :class:`~stpredict.models.DenseModel`, on the CPU and in evaluation mode.

    Raises
    ------
    InputError
        The folder is not an stpredict checkpoint, is corrupt, or was written by an incompatible version
        (the message names the version to install). Nothing in the folder is ever executed or unpickled.
    """
    envelope = read_config(path)
    folder = Path(path)
    if folder.is_file():
        folder = folder.parent
    cls_name = envelope["class"]
    if cls_name not in _REGISTRY and cls_name in _BUILTIN_MODULES:
        importlib.import_module(_BUILTIN_MODULES[cls_name])
    if cls_name not in _REGISTRY:
        known = sorted(set(_REGISTRY) | set(_BUILTIN_MODULES))
        msg = f"Checkpoint class {cls_name!r} is unknown; known classes: {known}."
        raise InputError(msg)
    weights_path = folder / WEIGHTS_NAME
    if not weights_path.is_file():
        msg = f"{str(folder)!r} has no {WEIGHTS_NAME}; the checkpoint is incomplete."
        raise InputError(msg)
    tensors = _read_weights(weights_path)
    return _REGISTRY[cls_name]._from_checkpoint_state(envelope["config"], tensors)


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict from a weights file without executing code in it.

    ``.safetensors`` files are read with safetensors; ``.pt``/``.pth``/``.bin``/``.ckpt`` files with
    ``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers. A state dict
    nested under ``"state_dict"``, ``"model"``, ``"module"`` or ``"params"`` is unwrapped.

    Parameters
    ----------
    path
        The weights file.

    Returns
    -------
    Tensor name → tensor, in the file's order.
    """
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        msg = f"Weights file {str(path)!r} does not exist."
        raise InputError(msg)
    if path.suffix == ".safetensors":
        return _read_weights(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)  # noqa: TID251 (the one sanctioned use)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as err:
        msg = (
            f"{str(path)!r} could not be read as a plain tensor checkpoint ({type(err).__name__}). Only state "
            "dicts of tensors are accepted (nothing is unpickled); convert the file to .safetensors."
        )
        raise InputError(msg) from err
    for _ in range(3):
        if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next(
                (obj[k] for k in ("state_dict", "model", "module", "params") if isinstance(obj.get(k), dict)), None
            )
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict) or not obj:
        msg = f"{str(path)!r} does not hold a state dict (a mapping of names to tensors)."
        raise InputError(msg)
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        msg = f"{str(path)!r} holds no tensors."
        raise InputError(msg)
    return tensors
