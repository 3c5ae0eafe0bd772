"""Checkpoint files: reading the reference's ``.pth`` (converted on the fly, with a restricted
unpickler) and hrnetdet's ``.safetensors`` with the config.json beside it, writing a model so that
it rebuilds exactly (``save_pretrained``), atomically and with the user's umask, and loading a state
dict strictly."""
import io
import json
import os
import zipfile
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .. import safe_pickle
from ..data.categories import category_ids_for
from ..detectors.settings import SCHEMA_VERSION, model_settings
from ..io import atomic_write, atomic_write_text
from ..names import CONFIG_FILE
from ..safe_pickle import Unpickled
from ..version import __version__
from .convert import (CheckpointError, convert_reference, identify_reference,
                      reference_categories)
from .registry import get_family, list_families

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


MAGIC_NUMBER = 0x1950a86a20f9469cfc6c  # what torch's pre-zip (before 1.6) format starts with
LEGACY_PROTOCOL = 1001


def _refuse_unpickled(path: str, obj: Any) -> None:
    """Refuse ``obj`` when a placeholder for a class hrnetdet will not unpickle is inside it."""
    names = {safe_pickle.placeholder_name(v) for v in safe_pickle.walk(obj) if isinstance(v, Unpickled)}
    if names:
        raise CheckpointError(f"{path}: holds objects hrnetdet will not unpickle ({', '.join(sorted(names))}) "
                              f"where a checkpoint has tensors: not a checkpoint hrnetdet can read")


def _refuse_non_tensors(path: str, state_dict: dict) -> None:
    """A state dict's keys are names and its values tensors; anything else is no checkpoint's."""
    odd = next((k for k, v in state_dict.items() if not (isinstance(k, str) and isinstance(v, Tensor))), None)
    if odd is not None:
        raise CheckpointError(f"{path}: its state_dict holds a {type(state_dict[odd]).__name__} "
                              f"under {str(odd)[:80]!r}, where a checkpoint has tensors")


def _torch_load(path: str) -> object:
    """What torch.save wrote, read by hrnetdet's own safe unpickler (hrnetdet/safe_pickle.py): a
    zip (torch >= 1.6) or the older sequence of pickles followed by the storages' bytes."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(0)
        if head[:2] != b"PK" and head[:1] != b"\x80":
            raise CheckpointError(f"{path}: not a checkpoint at all (neither a zip nor a pickle file)")
        try:
            return _load_zip(f, size) if head[:2] == b"PK" else _load_legacy(f, size)
        except safe_pickle.Refused as e:
            raise CheckpointError(f"{path}: truncated or corrupted PyTorch checkpoint ({e})") from None


def _storage_bytes(dtype: torch.dtype, numel: Any, key: Any, budget: List[int]) -> int:
    """The bytes a storage of ``numel`` elements takes, once the file is known to hold them: the
    storages together may not claim more than ``budget`` (the file's bytes not yet accounted for)."""
    if type(numel) is not int or numel < 0:
        raise safe_pickle.Refused(f"storage {str(key)[:40]!r} has no element count")
    nbytes = numel * dtype.itemsize
    if nbytes > budget[0]:
        raise safe_pickle.Refused(f"storage {str(key)[:40]!r} claims {nbytes} bytes, more than the file holds")
    budget[0] -= nbytes
    return nbytes


def _storage(data: bytearray, dtype: torch.dtype) -> safe_pickle.Storage:
    """A storage over ``data`` (shared, not copied); bools are made 0 or 1."""
    flat = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    if dtype == torch.bool:
        flat.copy_(flat.ne(0))
    return safe_pickle.Storage(flat.view(dtype))


def _storage_id(pid: Any, length: int) -> Tuple[safe_pickle.StorageType, str, Any]:
    """The type, key and element count a persistent id names (with ``length`` fields)."""
    if not (isinstance(pid, tuple) and len(pid) == length and pid[0] == "storage"
            and isinstance(pid[1], safe_pickle.StorageType) and isinstance(pid[2], str)):
        raise safe_pickle.Refused("a persistent id that is not a storage of a known type")
    return pid[1], pid[2], pid[4]


def _zip_member(f: BinaryIO, size: int, info: zipfile.ZipInfo, budget: List[int]) -> bytearray:
    """A stored (uncompressed, as torch writes them) member's bytes, read only when the file holds
    them and they overlap no member read before."""
    if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
        raise safe_pickle.Refused(f"zip member {info.filename[:60]!r} is compressed (torch stores them plain)")
    if not 0 <= info.header_offset <= size - 30:
        raise safe_pickle.Refused(f"zip member {info.filename[:60]!r} starts outside the file")
    f.seek(info.header_offset)
    local = f.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise safe_pickle.Refused(f"zip member {info.filename[:60]!r} has no local header")
    start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
    if start + info.file_size > size or info.file_size > budget[0]:
        raise safe_pickle.Refused(f"zip member {info.filename[:60]!r} claims more bytes than the file holds")
    budget[0] -= info.file_size
    data = bytearray(info.file_size)
    f.seek(start)
    if f.readinto(data) != len(data):
        raise safe_pickle.Refused(f"zip member {info.filename[:60]!r} is cut short")
    return data


def _load_zip(f: BinaryIO, size: int) -> object:
    try:
        members = {i.filename: i for i in zipfile.ZipFile(f).infolist()}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, OverflowError, NotImplementedError) as e:
        raise safe_pickle.Refused(f"not a readable zip: {type(e).__name__}") from None
    pickles = [n for n in members if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise safe_pickle.Refused("a zip without the one data.pkl of torch's format")
    prefix, budget = pickles[0][: -len("data.pkl")], [size]
    if prefix + "byteorder" in members and _zip_member(f, size, members[prefix + "byteorder"], budget) != b"little":
        raise safe_pickle.Refused("saved on a big-endian machine, which hrnetdet does not read")
    storages: Dict[str, safe_pickle.Storage] = {}

    def persistent_load(pid: Any) -> safe_pickle.Storage:
        storage_type, key, numel = _storage_id(pid, 5)
        if key not in storages:
            info = members.get(f"{prefix}data/{key}")
            if info is None:
                raise safe_pickle.Refused(f"storage {key[:40]!r} is not in the zip")
            nbytes = _storage_bytes(storage_type.dtype, numel, key, [info.file_size])
            storages[key] = _storage(_zip_member(f, size, info, budget)[:nbytes], storage_type.dtype)
        if storages[key].flat.dtype != storage_type.dtype:
            raise safe_pickle.Refused(f"storage {key[:40]!r} is read as two dtypes")
        return storages[key]

    return safe_pickle.load(io.BytesIO(_zip_member(f, size, members[pickles[0]], budget)), persistent_load)


def _no_storages(pid: Any) -> None:
    raise safe_pickle.Refused("a storage where the format has none")


class _Bounded:
    """A file whose reads never ask for more than is left in it: a length in a pickle may claim
    gigabytes, and a buffered file allocates what a read asks for before it reads."""

    def __init__(self, f: BinaryIO, size: int):
        self.f, self.size = f, size

    def read(self, n: int = -1) -> bytes:
        left = max(0, self.size - self.f.tell())
        return self.f.read(left if n is None or n < 0 else min(n, left))

    def readline(self) -> bytes:
        return self.f.readline()

    def tell(self) -> int:
        return self.f.tell()


def _load_legacy(f: BinaryIO, size: int) -> object:
    """torch's format before 1.6: magic number, protocol, system info, the object (whose storages
    are allocated as they are named, within the file's size), the storages' keys, their bytes."""
    f = _Bounded(f, size)
    if safe_pickle.load(f, _no_storages) != MAGIC_NUMBER:
        raise safe_pickle.Refused("a pickle, but not one torch.save wrote (no magic number)")
    if safe_pickle.load(f, _no_storages) != LEGACY_PROTOCOL:
        raise safe_pickle.Refused("an unknown version of torch's format")
    info = safe_pickle.load(f, _no_storages)
    if not isinstance(info, dict) or info.get("little_endian") is not True:
        raise safe_pickle.Refused("saved on a big-endian machine, which hrnetdet does not read")
    budget = [size - f.tell()]
    storages: Dict[str, Tuple[bytearray, safe_pickle.Storage]] = {}

    def persistent_load(pid: Any) -> safe_pickle.Storage:
        storage_type, key, numel = _storage_id(pid, 6)
        if pid[5] is not None:
            raise safe_pickle.Refused("a storage view, which only torch before 0.4 wrote")
        if key not in storages:
            data = bytearray(_storage_bytes(storage_type.dtype, numel, key, budget))
            storages[key] = (data, _storage(data, storage_type.dtype))
        return storages[key][1]

    obj = safe_pickle.load(f, persistent_load)
    keys = safe_pickle.load(f, _no_storages)
    if not isinstance(keys, list) or sorted(map(str, keys)) != sorted(storages):
        raise safe_pickle.Refused("its list of storages does not match the storages it uses")
    for key in keys:
        data, storage = storages[key]
        count = int.from_bytes(f.read(8), "little", signed=True)
        if count * storage.flat.element_size() != len(data) or f.f.readinto(data) != len(data):
            raise safe_pickle.Refused(f"storage {key[:40]!r} is cut short or of another size")
        if storage.flat.dtype == torch.bool:
            storage.flat.view(torch.uint8).copy_(storage.flat.view(torch.uint8).ne(0))
    return obj


def read_checkpoint(path: str) -> Checkpoint:
    """Read a reference ``.pth`` (converted on the fly) or an hrnetdet ``.safetensors`` file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such checkpoint file: {path}")
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
        _refuse_non_tensors(path, sd)
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
    ``create_model(directory)`` rebuilds the same model: its architecture, its whole settings record
    (``model.settings``, with the changes ``set_settings`` made since the build) as ``build_args``,
    its categories and their dataset ids. ``extra`` (provenance, validation metrics)
    is stored alongside. Returns the config."""
    from safetensors.torch import save_file
    arch = getattr(model, "arch", None)
    if arch is None:
        raise ValueError("save_pretrained needs a model from hrnetdet.create_model (model.arch names it)")
    family, width = get_family(arch)
    categories = list(model.categories)
    config = {
        "schema_version": SCHEMA_VERSION,
        "architecture": arch, "family": family.name, "width": width,
        "num_classes": len(categories),
        "categories": categories,
        "category_ids": category_ids_for(categories, getattr(model, "category_ids", None)),
        "build_args": model_settings(model).to_dict(),
        "hrnetdet_version": __version__,
        **(extra or {}),
    }
    os.makedirs(directory, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write(os.path.join(directory, WEIGHTS_FILE),
                 lambda tmp: save_file(sd, tmp, metadata={"hrnetdet": json.dumps(config)}))
    atomic_write_text(os.path.join(directory, CONFIG_FILE), json.dumps(config, indent=2))
    return config


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
