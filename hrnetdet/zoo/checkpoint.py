"""Checkpoint files: reading the reference's ``.pth`` (converted on the fly) and hrnetdet's
``.safetensors``, writing them atomically, and loading a state dict strictly."""
import json
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor, nn

from .convert import CheckpointError, convert_reference, identify_reference, reference_categories
from .registry import get_family, list_families


@dataclass
class Checkpoint:
    """A state dict in hrnetdet's layout plus what is known about it."""
    state_dict: Dict[str, Tensor]
    family: Optional[str] = None
    width: Optional[int] = None
    num_classes: Optional[int] = None
    categories: Optional[List[str]] = None


def _torch_load(path: str) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, random bytes...
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated, corrupted or "
                              f"not a checkpoint at all): {type(e).__name__}: {e}") from e


def read_checkpoint(path: str) -> Checkpoint:
    """Read a reference ``.pth`` (converted on the fly) or an hrnetdet ``.safetensors`` file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.endswith(".safetensors"):
        return _read_safetensors(path)
    obj = _torch_load(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):
        sd, meta = obj["state_dict"], obj.get("meta") or {}
        if any(k.startswith("module.") for k in sd):
            sd = {k[len("module."):]: v for k, v in sd.items()}
        family, width = identify_reference(sd, path, list_families())
        num_classes = family.reference.num_classes(sd)
        return Checkpoint(convert_reference(sd, family, path), family.name, width, num_classes,
                          reference_categories(meta, num_classes))
    if all(isinstance(v, Tensor) for v in obj.values()):
        return Checkpoint(dict(obj))
    raise CheckpointError(f"{path}: a dict without 'state_dict' whose values are not all tensors: "
                          f"not a checkpoint hrnetdet knows")


def _read_safetensors(path: str) -> Checkpoint:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        sd = load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupted): {e}") from e
    info = json.loads(meta.get("hrnetdet", "{}"))
    return Checkpoint(sd, info.get("family"), info.get("width"), info.get("num_classes"), info.get("categories"))


def save_safetensors(model: nn.Module, path: str, arch: str, extra: Optional[dict] = None) -> dict:
    """Write the model's weights atomically, with a config.json beside them; returns the config."""
    from safetensors.torch import save_file
    family, width = get_family(arch)
    config = {
        "architecture": arch, "family": family.name, "width": width,
        "num_classes": len(model.categories),
        "categories": list(model.categories),
        **(extra or {}),
    }
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(sd, tmp, metadata={"hrnetdet": json.dumps(config)}))
    cfg_path = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
    atomic_write(cfg_path, lambda tmp: open(tmp, "w").write(json.dumps(config, indent=2)))
    return config


def atomic_write(path: str, write: Callable[[str], object]) -> None:
    """``write(tmp)`` a file beside ``path``, then rename it over ``path``: readers see the old
    file or the new one, never a part."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_into(model: nn.Module, state_dict: Dict[str, Tensor], path: str, arch: str) -> None:
    """Strict load that names every missing, unexpected and mis-shaped key."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in own.items() if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append(f"{len(mismatched)} mismatched shapes, e.g. {mismatched[:4]}")
        if missing:
            parts.append(f"{len(missing)} missing keys, e.g. {missing[:4]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:4]}")
        raise CheckpointError(f"{path} does not fit {arch}: " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=True)
