"""Checkpoint files: reading the reference's ``.pth`` (converted on the fly, with a restricted
unpickler) and hrnetdet's ``.safetensors`` with the config.json beside it, writing a model so that
it rebuilds exactly (``save_pretrained``), atomically and with the user's umask, and loading a state
dict strictly."""
import codecs
import collections
import functools
import json
import os
import pickle
import types
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import Tensor, nn

from ..detectors.settings import build_args
from ..io import atomic_write, atomic_write_text
from ..version import __version__
from .convert import (CheckpointError, category_ids_for, convert_reference, identify_reference,
                      reference_categories)
from .registry import get_family, list_families

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class Checkpoint:
    """A state dict in hrnetdet's layout plus what is known about it: for hrnetdet's own files the
    saved config (architecture, build arguments, categories and their dataset ids)."""
    state_dict: Dict[str, Tensor]
    family: Optional[str] = None
    width: Optional[int] = None
    num_classes: Optional[int] = None
    categories: Optional[List[str]] = None
    config: Dict[str, Any] = field(default_factory=dict)


class Unpickled:
    """Stands in for an object of a class the restricted unpickler does not build (an mmengine
    ``HistoryBuffer``, a ``ConfigDict``, or worse): inert, it keeps nothing and runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any):
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


@functools.lru_cache(maxsize=None)
def _placeholder(module: str, name: str) -> type:
    return type(name, (Unpickled,), {"__module__": module, "__qualname__": name})


_TENSOR_REBUILDERS = ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                      "_rebuild_parameter_with_state", "_rebuild_meta_tensor_no_storage",
                      "_rebuild_device_tensor_from_numpy", "_rebuild_qtensor", "_rebuild_sparse_tensor")


def _allowed_global(module: str, name: str) -> Any:
    """What a checkpoint may build: tensors and their storages (torch handles storages itself),
    torch's value types, plain containers, and numpy arrays and scalars. None for anything else."""
    if module == "torch._utils" and name in _TENSOR_REBUILDERS:
        return getattr(torch._utils, name, None)
    if module == "torch" and (name in ("Size", "device") or isinstance(getattr(torch, name, None), torch.dtype)):
        return getattr(torch, name)
    plain = {("collections", "OrderedDict"): collections.OrderedDict, ("_codecs", "encode"): codecs.encode,
             ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "slice"): slice,
             ("builtins", "complex"): complex, ("builtins", "bytearray"): bytearray,
             ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    if (module, name) in plain:
        return plain[module, name]
    reconstruct, scalar = np.ndarray.__reduce__(np.zeros(1))[0], np.float64(0).__reduce__()[0]
    if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in ("_reconstruct", "scalar"):
        return reconstruct if name == "_reconstruct" else scalar
    if module == "numpy.dtypes" and name.endswith("DType"):
        return getattr(np.dtypes, name, None)
    return None


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds only what ``_allowed_global`` allows; every other class or function becomes an inert
    ``Unpickled`` placeholder named after it, so no code from the file ever runs."""

    def find_class(self, module: str, name: str) -> Any:
        found = _allowed_global(module, name)
        return found if found is not None else _placeholder(module, name)


_restricted_pickle = types.ModuleType("hrnetdet_restricted_pickle")
_restricted_pickle.Unpickler = _RestrictedUnpickler
_restricted_pickle.load = lambda f, **kw: _RestrictedUnpickler(f, **kw).load()


def _unpickled_names(obj: Any, found: Optional[set] = None) -> set:
    """``module.Class`` of every placeholder inside ``obj``'s dicts, lists and tuples."""
    found = set() if found is None else found
    if isinstance(obj, Unpickled):
        found.add(f"{type(obj).__module__}.{type(obj).__qualname__}")
    elif isinstance(obj, dict):
        for v in obj.values():
            _unpickled_names(v, found)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _unpickled_names(v, found)
    return found


def _refuse_unpickled(path: str, obj: Any) -> None:
    """Refuse ``obj`` when a placeholder for a class hrnetdet will not unpickle is inside it."""
    names = _unpickled_names(obj)
    if names:
        raise CheckpointError(f"{path}: holds objects hrnetdet will not unpickle ({', '.join(sorted(names))}) "
                              f"where a checkpoint has tensors: not a checkpoint hrnetdet can read")


def _torch_load(path: str) -> object:
    """torch's weights-only load; a file it refuses for the classes in it (an mmengine trainer's
    numpy values, HistoryBuffers, ConfigDicts) goes through the restricted unpickler instead."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] != b"PK" and head[:1] != b"\x80":  # a zip (torch >= 1.6) or a pickle (older torch)
        raise CheckpointError(f"{path}: not a checkpoint at all (neither a zip nor a pickle file)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # objects the weights-only unpickler does not build: the restricted one handles them
    except Exception as e:  # a zip without its central directory, a pickle cut short...
        raise CheckpointError(f"{path}: truncated or corrupted PyTorch checkpoint "
                              f"({type(e).__name__}: {_without_advice(e)})") from None
    try:
        return torch.load(path, map_location="cpu", pickle_module=_restricted_pickle, weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{path}: truncated or corrupted PyTorch checkpoint "
                              f"({type(e).__name__}: {_without_advice(e)})") from None


def _without_advice(e: Exception) -> str:
    """torch's message, first line only: its later lines advise loading with weights_only=False,
    which runs whatever code the file holds."""
    lines = [line for line in str(e).strip().splitlines() if "weights_only" not in line]
    return lines[0][:200] if lines else ""


def read_checkpoint(path: str) -> Checkpoint:
    """Read a reference ``.pth`` (converted on the fly) or an hrnetdet ``.safetensors`` file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.endswith(".safetensors"):
        return _read_safetensors(path)
    obj = _torch_load(path)
    if isinstance(obj, Unpickled):
        _refuse_unpickled(path, obj)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):
        sd, meta = obj["state_dict"], obj.get("meta")
        meta = meta if isinstance(meta, dict) else {}
        _refuse_unpickled(path, sd)  # the meta may hold anything: only the weights are checked
        if any(k.startswith("module.") for k in sd):
            sd = {k[len("module."):]: v for k, v in sd.items()}
        family, width = identify_reference(sd, path, list_families())
        num_classes = family.reference.num_classes(sd)
        return Checkpoint(convert_reference(sd, family, path), family.name, width, num_classes,
                          reference_categories(meta, num_classes))
    if all(isinstance(v, Tensor) for v in obj.values()):
        return Checkpoint(dict(obj))
    _refuse_unpickled(path, obj)
    raise CheckpointError(f"{path}: a dict without 'state_dict' whose values are not all tensors: "
                          f"not a checkpoint hrnetdet knows")


def _read_safetensors(path: str) -> Checkpoint:
    """The weights, and the config: the config.json beside them when there is one (what
    save_pretrained writes, and what a user may edit), else the copy in the file's header."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open
    try:
        with safe_open(path, framework="pt") as f:
            header = (f.metadata() or {}).get("hrnetdet", "{}")
        sd = load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupted): {e}") from e
    beside = os.path.join(os.path.dirname(os.path.abspath(path)), CONFIG_FILE)
    config = read_config(beside) if os.path.isfile(beside) else _json(header, f"{path} (its 'hrnetdet' header)")
    return Checkpoint(sd, config.get("family"), config.get("width"), config.get("num_classes"),
                      config.get("categories"), config)


def read_config(path: str) -> Dict[str, Any]:
    """A config.json as save_pretrained writes it."""
    with open(path) as f:
        return _json(f.read(), path)


def _json(text: str, where: str) -> Dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{where}: broken JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{where}: holds a JSON {type(value).__name__}, not an object")
    return value


def save_pretrained(model: nn.Module, directory: str, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Write ``model.safetensors`` and ``config.json`` into ``directory``, from which
    ``create_model(directory)`` rebuilds the same model: its architecture, every build argument that
    differs from the family's defaults (read from the model itself, so settings changed after it was
    built count), its categories and their dataset ids. ``extra`` (provenance, validation metrics)
    is stored alongside. Returns the config."""
    from safetensors.torch import save_file
    arch = getattr(model, "arch", None)
    if arch is None:
        raise ValueError("save_pretrained needs a model from hrnetdet.create_model (model.arch names it)")
    family, width = get_family(arch)
    categories = list(model.categories)
    config = {
        "architecture": arch, "family": family.name, "width": width,
        "num_classes": len(categories),
        "categories": categories,
        "category_ids": category_ids_for(categories, getattr(model, "category_ids", None)),
        "build_args": changed_build_args(model),
        "hrnetdet_version": __version__,
        **(extra or {}),
    }
    os.makedirs(directory, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write(os.path.join(directory, WEIGHTS_FILE),
                 lambda tmp: save_file(sd, tmp, metadata={"hrnetdet": json.dumps(config)}))
    atomic_write_text(os.path.join(directory, CONFIG_FILE), json.dumps(config, indent=2))
    return config


@functools.lru_cache(maxsize=None)
def _default_build_args(arch: str) -> Dict[str, Any]:
    family, width = get_family(arch)
    with torch.device("meta"):
        return build_args(family.build(width))


def changed_build_args(model: nn.Module) -> Dict[str, Any]:
    """The model's build arguments that differ from its architecture's defaults."""
    defaults = _default_build_args(model.arch)
    return {k: v for k, v in build_args(model).items() if k not in defaults or defaults[k] != v}


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
