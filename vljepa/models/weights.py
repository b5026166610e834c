"""Reading weights files safely: safetensors, or a legacy pickle that holds nothing but tensors."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from vljepa.config import ConfigError

LEGACY_SUFFIXES = (".bin", ".pt", ".pth")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, by name, on the CPU.

    ``.safetensors`` is read with safetensors; a legacy ``.bin`` / ``.pt`` / ``.pth`` with
    ``torch.load(weights_only=True)``, which refuses to unpickle anything but tensors and plain
    containers. A checkpoint that wraps its weights in ``{"state_dict": ...}`` gives that dict.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"weights file '{path}' does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError as exc:
            raise ConfigError(f"cannot read weights file '{path}' ({exc}); re-save it (safetensors.torch.save_file) "
                              "or point to a complete copy") from exc
    if path.suffix not in LEGACY_SUFFIXES:
        raise ConfigError(f"weights file '{path}' is neither .safetensors nor a legacy {'/'.join(LEGACY_SUFFIXES)} file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message advises weights_only=False, which would run the pickle's code.
        raise ConfigError(
            f"weights file '{path}' is not a plain PyTorch state dict: it holds pickled objects other than "
            "tensors (which vljepa does not unpickle: unpickling can run code) or is not a PyTorch file. If you "
            "trust it, load it yourself and re-save it as safetensors "
            "(safetensors.torch.save_file(state_dict, 'model.safetensors'))"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"weights file '{path}' is not a state dict (tensor names -> tensors); "
                          "re-save it as one, preferably as safetensors")
    return state
