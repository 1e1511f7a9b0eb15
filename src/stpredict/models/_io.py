"""Checkpoints: ``config.json`` + ``weights.safetensors``, written atomically and read without unpickling.

Any model class that wants ``model.save`` / :func:`stpredict.models.load` registers itself with
:func:`register_model` and implements two methods:

``_checkpoint_state(self) -> tuple[dict, dict[str, torch.Tensor]]``
    JSON-serialisable configuration (everything needed to rebuild the object) and its tensors.
``_from_checkpoint_state(cls, config: dict, tensors: dict[str, torch.Tensor]) -> Self`` (classmethod)
    The inverse.

:func:`save_model` and :func:`load` add the envelope (class name, format and library versions, and SHA-256 digests
of the weights file and of the envelope itself) and do the validation, so model classes never touch files themselves.
A damaged or edited file is refused at load, naming it; a checkpoint from a newer stpredict loads with a warning.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import shutil
import sys
import tempfile
import warnings
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from stpredict._errors import InputError
from stpredict._logging import get_logger
from stpredict._version import __version__

from ._folders import check_replaceable, file_sha256, fsync_file, replace_folder

if TYPE_CHECKING:
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
#: 1.1 adds ``weights_sha256`` (of the weights file's bytes) and ``envelope_sha256`` (of config.json's content:
#: :func:`_envelope_sha256`); 1.0 checkpoints have neither and load unverified.
FORMAT_VERSION = "1.1"
_DIGESTS_SINCE = (1, 1)
_DIGEST_KEYS = ("weights_sha256", "envelope_sha256")
_MAX_CONFIG_BYTES = 64 * 2**20
_REQUIRED_KEYS = ("format", "format_version", "stpredict_version", "class", "config")

#: Where built-in model classes live, so that :func:`load` can import them before dispatching.
_BUILTIN_MODULES = {
    "PixNet": "stpredict.models._pixnet._model",
    "SpotCNN": "stpredict.models._baselines._spotcnn",
    "EmbeddingRidge": "stpredict.models._baselines._embedding_ridge",
    "MagNet": "stpredict.models._magnet._model",
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


def _parse_version(text: object, what: str, where: Path | None = None) -> tuple[int, int]:
    try:
        major, minor = str(text).split(".")[:2]
        return int(major), int(minor)
    except ValueError as err:
        source = f" in {str(where)!r}" if where else ""
        msg = f"Checkpoint {what} {text!r}{source} is not of the form 'major.minor'; it is not an stpredict checkpoint."
        raise InputError(msg) from err


def _release(text: object, where: Path) -> tuple[int, ...]:
    """The release numbers of a library version (``"0.2.1.dev3+g1a2b"`` → ``(0, 2, 1)``), padded for comparison."""
    match = re.match(r"\d+(\.\d+)*", str(text))
    if match is None:
        msg = f"{str(where)!r} records stpredict_version {text!r}, not a version number; the checkpoint is corrupt."
        raise InputError(msg)
    numbers = tuple(int(part) for part in match.group().split("."))
    return numbers + (0,) * (4 - len(numbers))


def _warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` at the first frame outside stpredict, so the warning points at the user's line.

    scanpy's ``warn`` does this with ``skip_file_prefixes`` (Python >= 3.12); the frame walk works on 3.11 too.
    """
    package = str(Path(__file__).parents[1]) + os.sep
    frame = sys._getframe(1)
    level = 2
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)


def _envelope_sha256(envelope: dict[str, Any]) -> str:
    """SHA-256 of the envelope as canonical JSON (sorted keys, no spaces, ASCII), without ``envelope_sha256``.

    Computed on the parsed JSON, so any change that alters a value is caught and harmless reformatting is not.
    """
    body = {key: value for key, value in envelope.items() if key != "envelope_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _damaged(path: Path, key: str, recorded: object, found: str) -> InputError:
    msg = (
        f"{str(path)!r} does not match the digest recorded when the model was saved ({key} {recorded}, found "
        f"{found}): the file was damaged or edited after model.save wrote it, so the model would predict wrong "
        "values. Load the original checkpoint, or re-save the model with model.save(...) or download it again."
    )
    return InputError(msg)


def _is_checkpoint_config(path: Path) -> bool:
    try:
        if path.stat().st_size > _MAX_CONFIG_BYTES:
            return False
        envelope = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(envelope, dict) and envelope.get("format") == FORMAT_NAME


#: How save_model replaces an existing folder: only its own two files, with stpredict's format name in config.json.
_check_replaceable = partial(
    check_replaceable,
    files=(CONFIG_NAME, WEIGHTS_NAME),
    is_ours=lambda folder: _is_checkpoint_config(folder / CONFIG_NAME),
    what="an stpredict checkpoint folder (written by model.save)",
)
_replace_folder = partial(replace_folder, **_check_replaceable.keywords)


def save_model(model: Any, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write ``model`` to the folder ``path`` as ``config.json`` + ``weights.safetensors``.

    The folder is written beside its final name and renamed into place, so an interrupted save never leaves
    a half-written checkpoint under ``path``, and a failed replacement keeps the old checkpoint. ``config.json``
    records SHA-256 digests of the weights file and of its own content, which :func:`load` verifies.

    Parameters
    ----------
    model
        An instance of a class decorated with :func:`register_model`.
    path
        Folder to create.
    overwrite
        Replace an existing checkpoint at ``path``. Only a folder written by ``model.save`` (holding nothing but
        its two files) or an empty folder is replaced; any other file or folder is refused and left untouched.

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
    if path.name in {"", ".."}:
        path = path.resolve()
    if path.exists() or path.is_symlink():
        if not overwrite:
            msg = f"{str(path)!r} already exists; pass overwrite=True or choose another folder."
            raise FileExistsError(msg)
        _check_replaceable(path)
    config, tensors = model._checkpoint_state()
    envelope = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "stpredict_version": _library_version(),
        "class": cls_name,
        "config": config,
    }
    envelope = json.loads(json.dumps(envelope, allow_nan=False))  # digest what load will parse (lists, str keys)
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
        save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt", "stpredict_class": cls_name})
        fsync_file(tmp / WEIGHTS_NAME)
        envelope["weights_sha256"] = file_sha256(tmp / WEIGHTS_NAME)
        envelope["envelope_sha256"] = _envelope_sha256(envelope)
        (tmp / CONFIG_NAME).write_text(json.dumps(envelope, indent=2), encoding="utf-8")
        fsync_file(tmp / CONFIG_NAME)
        _replace_folder(tmp, path)
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
    version = _parse_version(envelope["format_version"], "format version", config_path)
    written_by, ours = envelope["stpredict_version"], _parse_version(FORMAT_VERSION, "format version")[0]
    if version[0] > ours and _release(written_by, config_path) > _release(_library_version(), config_path):
        msg = (
            f"{str(config_path)!r} uses checkpoint format {envelope['format_version']}, written by stpredict "
            f"{written_by}; this stpredict ({_library_version()}) reads format {ours}.x. "
            f"Install stpredict>={written_by} to load it."
        )
        raise InputError(msg)
    if version[0] < ours:
        msg = (
            f"{str(config_path)!r} uses the old checkpoint format {envelope['format_version']} (stpredict "
            f"{written_by}), which this stpredict ({_library_version()}) no longer reads. "
            f"Load it with stpredict=={written_by} and re-save it, or retrain."
        )
        raise InputError(msg)
    if version[0] > ours:  # a newer format that names an older writer: the file was changed
        msg = (
            f"{str(config_path)!r} names checkpoint format {envelope['format_version']} but stpredict {written_by}, "
            "which never wrote that format: the file was damaged or edited. Load the original checkpoint, or re-save "
            "or download it again."
        )
        raise InputError(msg)
    _verify_envelope(envelope, version, config_path)
    if not isinstance(envelope["config"], dict) or not isinstance(envelope["class"], str):
        msg = f"{str(config_path)!r} has a malformed 'config' or 'class' entry; the checkpoint is corrupt."
        raise InputError(msg)
    return envelope


def _verify_envelope(envelope: dict[str, Any], version: tuple[int, int], config_path: Path) -> None:
    """Check the digests' presence and form (required from format 1.1 on) and the envelope's own digest."""
    for key in _DIGEST_KEYS:
        value = envelope.get(key)
        if value is None and version >= _DIGESTS_SINCE:
            msg = (
                f"{str(config_path)!r} lacks {key!r}, which checkpoint format {envelope['format_version']} records: "
                "the file was damaged or edited. Load the original checkpoint, or re-save or download it again."
            )
            raise InputError(msg)
        if value is not None and not (isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value)):
            msg = f"{str(config_path)!r} has {key} {value!r}, not a SHA-256 hex digest; the checkpoint is corrupt."
            raise InputError(msg)
    if "envelope_sha256" in envelope and (found := _envelope_sha256(envelope)) != envelope["envelope_sha256"]:
        raise _damaged(config_path, "envelope_sha256", envelope["envelope_sha256"], found)


def _check_weights(envelope: dict[str, Any], folder: Path, weights_path: Path) -> None:
    """Verify the weights file against its recorded digest, or log that a pre-digest checkpoint cannot be."""
    recorded = envelope.get("weights_sha256")
    if recorded is None:
        logger.warning(
            "%r was saved by stpredict %s (checkpoint format %s) without digests, so damage to its files cannot be "
            "verified; re-save it with model.save(..., overwrite=True) to record them.",
            str(folder),
            envelope["stpredict_version"],
            envelope["format_version"],
        )
    elif (found := file_sha256(weights_path)) != recorded:
        raise _damaged(weights_path, "weights_sha256", recorded, found)


def _warn_if_newer(envelope: dict[str, Any], config_path: Path) -> None:
    theirs, ours = envelope["stpredict_version"], _library_version()
    if _release(theirs, config_path) > _release(ours, config_path):
        _warn(
            f"{str(config_path)!r} was written by stpredict {theirs}, newer than the running stpredict {ours}. "
            f"Its checkpoint format ({envelope['format_version']}) is readable here, so it loads, but what changed "
            f"after {ours} (defaults, preprocessing, fixes) is not applied, so predictions may differ from those of "
            f"stpredict {theirs}. Upgrade with `pip install -U 'stpredict>={theirs}'` to use it as written."
        )


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
        The folder is not an stpredict checkpoint, is corrupt, a file does not match the digest recorded at save
        (damaged or edited: the message names the file), or it was written by an incompatible version (the message
        names the version to install). Nothing in the folder is ever executed or unpickled.

    Warns
    -----
    UserWarning
        The checkpoint was written by a newer stpredict whose format this one still reads; predictions may differ.
        Checkpoints saved before digests were recorded load with a logged note that they cannot be verified.
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
    _warn_if_newer(envelope, folder / CONFIG_NAME)
    _check_weights(envelope, folder, weights_path)
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


def _jsonable(value: Any) -> Any:
    """Numpy scalars/arrays and tuples → plain JSON types (lists, floats, ints), recursively."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def network_checkpoint_state(model: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The checkpoint of a model with ``config``, ``var_names``, fit records and a torch ``module``.

    Returns the JSON config (``params``, ``var_names``, ``normalization``, ``fit_history``, ``fit_params``) and the
    module's state dict, as PixNet and MagNet save them.
    """
    config = {
        "params": _jsonable(model.config),
        "var_names": list(model.var_names),
        "normalization": _jsonable(model.normalization),
        "fit_history": _jsonable(model.fit_history),
        "fit_params": _jsonable(model.fit_params),
    }
    return config, dict(model.module.state_dict())


def restore_network(model: Any, config: dict[str, Any], tensors: dict[str, Any]) -> None:
    """Load ``tensors`` into ``model.module`` (strictly) and its fit records from ``config``; eval mode."""
    name = type(model).__name__
    try:
        model.module.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        msg = f"The checkpoint's weights do not fit the {name} its config describes; the file is corrupt ({err})."
        raise InputError(msg) from err
    model.normalization = config.get("normalization")
    model.fit_history = config.get("fit_history")
    model.fit_params = config.get("fit_params")
    model.module.eval()
