"""What a :func:`stpredict.tl.predict_dense` work store computes: the identity that decides whether it may resume.

An unfinished map is resumed only by a run that computes the very same map: the same model weights (a digest of
the model's tensors), genes, normalisation and value kind, the same image (key, shape, channel order, value scale,
pyramid level) and the same tiling, stride, tissue tiles and storage type. :func:`identity` lists these fields and
:func:`differences` names the ones in which two runs differ.
"""

from __future__ import annotations

import hashlib
import json
import sys
from typing import TYPE_CHECKING, Any

import numpy as np

from stpredict._errors import InputError

if TYPE_CHECKING:
    from stpredict.models._base import DenseModel

    from ._dense_plan import MapLayout

__all__ = ["FORMAT", "NO_WEIGHTS", "differences", "identity", "model_digest"]

#: Version of the identity's layout: a work store written with another layout is never resumed.
FORMAT = 2
#: Why a work store of a model without a digest is not resumed (``.format(name=model.name)``).
NO_WEIGHTS = (
    "the model {name!r} exposes no weights (`_checkpoint_state()`, `module.state_dict()` or `state_dict()`) "
    "to check that it is the model that started it"
)

#: Field → how a message names it.
_LABELS = {
    "format": "work store format",
    "model_weights": "model weights",
    "model": "model (class and name)",
    "normalization": "model normalisation",
    "value_kind": "model value kind",
    "var_names": "model genes",
    "genes": "genes",
    "image": "image key",
    "image_shape": "image shape",
    "image_input": "image channels and value scale",
    "level": "pyramid level read",
    "ratio": "resampling",
    "model_geometry": "model µm per pixel, output stride, tile size and context",
    "tiling": "tiling (overlap, chunk size, panel width)",
    "shape": "map shape",
    "dtype": "dtype",
    "tiles": "tiles over tissue",
    "tissue": "tissue mask",
}


def _sha(data: str | bytes) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def _mask_sha(mask: np.ndarray) -> str:
    return _sha(np.packbits(mask).tobytes() + str(mask.shape).encode())


def _model_tensors(model: Any) -> dict[str, Any] | None:
    """The model's named tensors: its checkpoint state, else ``model.module.state_dict()``, else ``state_dict()``."""
    state = getattr(model, "_checkpoint_state", None)
    if callable(state):
        try:
            return dict(state()[1])
        except InputError:  # e.g. a baseline that is not fitted: try its network's tensors
            pass
    for owner in (getattr(model, "module", None), model):
        get = getattr(owner, "state_dict", None)
        if callable(get):
            return dict(get())
    return None


def _tensor_bytes(value: Any) -> tuple[str, tuple[int, ...], Any]:
    """Dtype name, shape and contiguous bytes of a torch tensor or an array, without a copy where possible."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        t = value.detach().to("cpu").contiguous()
        return str(t.dtype), tuple(t.shape), t.reshape(-1).view(torch.uint8).numpy()
    a = np.asarray(value)
    return str(a.dtype), a.shape, np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def model_digest(model: Any) -> str | None:
    """SHA-256 of the model's tensors (names, dtypes, shapes and bytes, in name order); ``None`` if it exposes none.

    The tensors are those :func:`stpredict.models.save` writes (``model._checkpoint_state()``), else those of
    ``model.module.state_dict()`` or ``model.state_dict()``. Hashing reads each tensor once (about 1 GB/s).
    """
    tensors = _model_tensors(model)
    if tensors is None:
        return None
    h = hashlib.sha256()
    for name in sorted(tensors):
        dtype, shape, buffer = _tensor_bytes(tensors[name])
        h.update(json.dumps([name, dtype, list(shape)]).encode())
        h.update(buffer)
    return h.hexdigest()


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else repr(v)))


def identity(layout: MapLayout, model: DenseModel, gene_list: list[str], dtype: str, digest: str | None) -> dict:
    """Everything that determines the map, JSON-serialisable; a work store with another identity is not resumed."""
    plan, tissue = layout.plan, layout.tissue
    normalization = getattr(model, "normalization", None)
    return {
        "format": FORMAT,
        "model_weights": digest,
        "model": [type(model).__qualname__, model.name],
        "normalization": None if normalization is None else _sha(json.dumps(_jsonable(normalization), sort_keys=True)),
        "value_kind": model.value_kind,
        "var_names": _sha("\n".join(model.var_names)),
        "genes": _sha("\n".join(gene_list)),
        "image": layout.image_key,
        "image_shape": list(layout.image_shape),
        "image_input": [list(layout.source.channels), layout.source.scale],
        "level": layout.level_index,
        "ratio": list(plan.ratio),
        "model_geometry": [model.um_per_px, plan.stride, plan.tile, model.context],
        "tiling": [plan.gy.n, plan.gy.context, plan.gy.ramp, plan.gy.chunk, plan.panel],
        "shape": list(layout.shape),
        "dtype": dtype,
        "tiles": _mask_sha(plan.run),
        "tissue": None if tissue is None else _mask_sha(tissue.mask),
    }


def _short(value: Any) -> str:
    if isinstance(value, str) and len(value) > 12:  # a digest
        return value[:12] + "…"
    text = json.dumps(value)
    return text[:40] + "…" if len(text) > 41 else text


def differences(old: Any, new: dict) -> list[str]:
    """The fields in which the stored identity ``old`` differs from ``new``, named for a message."""
    if not isinstance(old, dict):
        return ["work store format (unreadable record)"]
    if old.get("format") != new.get("format"):
        return [f"work store format ({_short(old.get('format'))} → {new.get('format')}, another stpredict version)"]
    out = []
    for key in dict.fromkeys([*new, *old]):
        if old.get(key) != new.get(key):
            label = _LABELS.get(key, key)
            out.append(f"{label} ({_short(old.get(key))} → {_short(new.get(key))})")
    return out
