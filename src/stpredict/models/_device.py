"""Pick the torch device a model runs on."""

from __future__ import annotations

from typing import TYPE_CHECKING

from stpredict._errors import InputError
from stpredict._settings import settings

if TYPE_CHECKING:
    import torch

__all__ = ["resolve_device"]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Turn ``"auto"`` (or ``None``) into CUDA, then MPS, then CPU; pass anything else to :class:`torch.device`.

    ``None`` and ``"auto"`` first consult :attr:`stpredict.settings.device`.
    """
    import torch

    if isinstance(device, torch.device):
        return device
    if device is None or device == "auto":
        device = settings.device
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        msg = f"Unknown device {device!r}; pass 'auto', 'cpu', 'cuda', 'cuda:0' or 'mps'."
        raise InputError(msg) from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        msg = f"Device {device!r} was requested but CUDA is not available; pass device='auto' or 'cpu'."
        raise InputError(msg)
    return resolved
