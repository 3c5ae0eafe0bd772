"""Getting weights, each file fetched at most once and checked before use.

* Published weights: ``hf_hub_download`` at the record's pinned commit, then our own sha256 check
  (huggingface_hub only checks the size); online, an unreachable Hub or a missing repository falls
  back to the reference's checkpoint.
* Records without published weights (every record today): the reference's own checkpoint, checked
  against the sha256 prefix in its file name, converted once (one process at a time) and cached as
  safetensors under ``$HRNETDET_HOME`` (default ``~/.cache/hrnetdet``).
* ``hf-hub:org/name[@revision]``: any repository ``hrnetdet push`` wrote (its config.json and
  model.safetensors, side by side in the Hub cache).
* Backbone-only initialisation: timm's ImageNet HRNet from the Hub (our HRNet's names are timm's).
* ``num_classes`` other than the checkpoint's: everything but the class-dependent layers.

Offline (``HF_HUB_OFFLINE=1`` or ``local_files_only=True``) nothing is requested, and a missing file
is an error that says which file to put where. ``hrnetdet download`` fills a folder that can be
copied to an air-gapped machine.
"""
import functools
import hashlib
import logging
import os
import re
import urllib.error
from pathlib import Path
from typing import Callable, Dict, FrozenSet, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..backbone import HRNet
from ..io import atomic_write_text, hrnetdet_home
from ..names import HF_HUB_PREFIX
from ..version import __version__
from .checkpoint import CONFIG_FILE, WEIGHTS_FILE, Checkpoint, load_into, read_checkpoint, save_pretrained
from .convert import CheckpointError
from .records import REFERENCE_URL_ROOT, PretrainedCfg, arch_name
from .registry import get_family

logger = logging.getLogger("hrnetdet")

REFERENCE_ROOT_ENV = "HRNETDET_REFERENCE_URL"  # a mirror of REFERENCE_URL_ROOT
_TRUE = {"1", "ON", "YES", "TRUE"}


def hub_cache_dir() -> str:
    """huggingface_hub's cache, read now rather than when huggingface_hub was imported."""
    from huggingface_hub import constants
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return constants.HF_HUB_CACHE


def is_offline(local_files_only: bool = False) -> bool:
    from huggingface_hub import constants
    return (local_files_only or constants.HF_HUB_OFFLINE
            or os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _remove(path: str) -> None:
    """Delete a file, and the blob behind it when it is a Hub cache symlink."""
    real = os.path.realpath(path)
    for p in {path, real}:
        if os.path.lexists(p):
            os.remove(p)


def _verified(fetch: Callable[[bool], str], expected: str, what: str, retry: bool) -> str:
    """``fetch(force)`` returns a local file whose sha256 must start with ``expected`` (a full digest
    or a prefix). A mismatch deletes the file and, when ``retry``, fetches it once more."""
    path = fetch(False)
    for attempt in range(2):
        actual = sha256_file(path)
        if actual.startswith(expected):
            return path
        _remove(path)
        if attempt == 1 or not retry:
            break
        logger.warning("%s: %s has sha256 %s, expected %s...; deleted it, fetching it again",
                       what, path, actual, expected)
        path = fetch(True)
    raise CheckpointError(
        f"{what}: {path} is corrupted or truncated: sha256 {actual}, expected {expected}"
        f"{'...' if len(expected) < 64 else ''}. The file was deleted"
        + ("; it failed again after a fresh download: check the server or mirror." if retry
           else "; fetch it again online."))


def _hub_file(repo_id: str, filename: str, revision: Optional[str], *, cache_dir: str,
              local_files_only: bool, force: bool, hint: str) -> str:
    """``hf_hub_download`` tagged with hrnetdet's name and version; a file that is neither cached
    nor reachable is a FileNotFoundError that says where it belongs."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:
        return hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir,
                               library_name="hrnetdet", library_version=__version__,
                               local_files_only=local_files_only, force_download=force,
                               endpoint=os.environ.get("HF_ENDPOINT") or None)
    except LocalEntryNotFoundError as e:
        where = os.path.join(cache_dir, f"models--{repo_id.replace('/', '--')}", "snapshots",
                             revision or "<commit>", filename)
        why = ("hrnetdet is offline (HF_HUB_OFFLINE=1 or local_files_only=True)" if local_files_only
               else f"the Hub ({os.environ.get('HF_ENDPOINT') or 'huggingface.co'}) could not be reached")
        raise FileNotFoundError(
            f"{why} and {repo_id}/{filename} (revision {revision or 'main'}) is not in the Hub cache: "
            f"expected at {where}. {hint}") from e


def _air_gap_hint(name: str) -> str:
    return (f"On a connected machine run `hrnetdet download {name} --dir DIR`, copy DIR here and set "
            f"HRNETDET_HOME=DIR HF_HOME=DIR; or pass checkpoint_path= a local .pth/.safetensors file.")


def converted_path(cfg: PretrainedCfg, home: Optional[str] = None) -> str:
    """Where the converted reference checkpoint of ``cfg`` is cached."""
    return os.path.join(home or hrnetdet_home(), "converted", cfg.name, WEIGHTS_FILE)


def fetch_pretrained(cfg: PretrainedCfg, *, local_files_only: bool = False, home: Optional[str] = None,
                     cache_dir: Optional[str] = None) -> str:
    """The local path of ``cfg``'s weights (hrnetdet safetensors), fetching only what is missing."""
    offline = is_offline(local_files_only)
    if cfg.hf_hub_id is not None:
        from huggingface_hub.errors import HfHubHTTPError
        if not re.fullmatch(r"[0-9a-f]{40}", cfg.hf_revision or ""):
            raise ValueError(f"{cfg.name}: hf_revision must be a full 40-hex commit, got {cfg.hf_revision!r}")
        fetch = functools.partial(_hub_file, cfg.hf_hub_id, cfg.hf_filename, cfg.hf_revision,
                                  cache_dir=cache_dir or hub_cache_dir(), local_files_only=offline,
                                  hint=_air_gap_hint(cfg.name))
        try:
            if cfg.sha256 is None:
                return fetch(force=False)
            return _verified(lambda force: fetch(force=force), cfg.sha256,
                             f"{cfg.name} ({cfg.hf_hub_id}@{cfg.hf_revision})", retry=not offline)
        except (FileNotFoundError, ConnectionError, HfHubHTTPError) as e:
            if offline:
                raise
            # The Hub is unreachable or the repository is gone: the reference is the fallback (a
            # checksum mismatch is not caught: a tampered file is refused, not worked around).
            logger.warning("%s: %s; falling back to the reference checkpoint", cfg.name, str(e).splitlines()[0])
    return _converted_reference(cfg, home or hrnetdet_home(), offline)


def _converted_reference(cfg: PretrainedCfg, home: str, offline: bool) -> str:
    """The reference checkpoint converted once and cached, with its sha256 beside it. Processes
    sharing ``home`` (torchrun ranks) take turns on a lock file: one downloads and converts, the
    others then find the result; no file another process may be reading is deleted."""
    from filelock import FileLock
    path = converted_path(cfg, home)
    if _converted_ok(cfg, path, warn=False):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with FileLock(path + ".lock"):
        if _converted_ok(cfg, path):  # another process converted it while this one waited
            return path
        pth = _reference_file(cfg, home, offline)
        ckpt = read_checkpoint(pth)
        family, width = get_family(cfg.arch)
        model = family.build(width, num_classes=ckpt.num_classes, categories=ckpt.categories)
        load_into(model, ckpt.state_dict, pth, cfg.arch)  # a strict load checks the conversion before it is cached
        model.arch = cfg.arch
        save_pretrained(model, os.path.dirname(path), {"weights": cfg.name, "source": cfg.reference_url})
        atomic_write_text(path + ".sha256", sha256_file(path))
        os.remove(pth)  # the converted file replaces it; only a lock holder reads it
    logger.info("%s: converted %s to %s", cfg.name, cfg.reference_file, path)
    return path


def _converted_ok(cfg: PretrainedCfg, path: str, warn: bool = True) -> bool:
    """Whether the cached conversion is there and matches the sha256 beside it (a file placed by
    hand has none). A mismatch is converted again and replaced, never deleted under a reader."""
    if not os.path.exists(path):
        return False
    if not os.path.exists(path + ".sha256"):
        return True
    expected = Path(path + ".sha256").read_text().strip()
    actual = sha256_file(path)
    if actual != expected and warn:
        logger.warning("%s: %s has sha256 %s, expected %s; converting it again", cfg.name, path, actual, expected)
    return actual == expected


def _reference_file(cfg: PretrainedCfg, home: str, offline: bool) -> str:
    dst = os.path.join(home, "reference", cfg.reference_file)
    url = cfg.reference_url_at(os.environ.get(REFERENCE_ROOT_ENV) or REFERENCE_URL_ROOT)

    def fetch(force: bool) -> str:
        if os.path.exists(dst) and not force:
            return dst
        if offline:
            raise FileNotFoundError(
                f"hrnetdet is offline (HF_HUB_OFFLINE=1 or local_files_only=True) and {cfg.name} is not "
                f"cached: expected the converted weights at {converted_path(cfg, home)}, or the reference "
                f"checkpoint {url} at {dst} (converted on first use). {_air_gap_hint(cfg.name)}")
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        progress = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").upper() not in _TRUE
        try:
            torch.hub.download_url_to_file(url, dst, progress=progress)
        except (urllib.error.URLError, OSError) as e:
            raise ConnectionError(f"could not download {cfg.name}'s reference checkpoint {url}: {e}. "
                                  f"Set {REFERENCE_ROOT_ENV} to a mirror, or: {_air_gap_hint(cfg.name)}") from e
        return dst

    return _verified(fetch, cfg.reference_sha256_prefix, f"{cfg.name} reference checkpoint {url}",
                     retry=not offline)




def hub_model_files(repo_id: str, revision: Optional[str], *, weights: bool = True,
                    local_files_only: bool = False) -> Tuple[str, Optional[str]]:
    """A Hub repository written by ``hrnetdet push`` (or holding save_pretrained's two files): the
    local paths of its config.json and, with ``weights``, its model.safetensors, side by side in
    the Hub cache. Offline (HF_HUB_OFFLINE=1) the cache answers."""
    fetch = functools.partial(_hub_file, repo_id, revision=revision, cache_dir=hub_cache_dir(),
                              local_files_only=is_offline(local_files_only), force=False,
                              hint=f"Load {HF_HUB_PREFIX}{repo_id} once online to fill the cache.")
    config = fetch(filename=CONFIG_FILE)
    return config, (fetch(filename=WEIGHTS_FILE) if weights else None)


def load_pretrained_checkpoint(cfg: PretrainedCfg, *, local_files_only: bool = False) -> Checkpoint:
    """``cfg``'s weights in hrnetdet's layout (fetched if needed), checked to be of ``cfg.arch``."""
    path = fetch_pretrained(cfg, local_files_only=local_files_only)
    ckpt = read_checkpoint(path)
    if ckpt.family is not None and arch_name(ckpt.family, ckpt.width) != cfg.arch:
        raise CheckpointError(f"{path} ({cfg.name}) holds a {arch_name(ckpt.family, ckpt.width)} checkpoint")
    return ckpt


def backbone_weights_file(weights: Union[bool, str], width: int, *, local_files_only: bool = False,
                          cache_dir: Optional[str] = None) -> str:
    """timm's ImageNet HRNet weights (``True``: ``hrnet_w{width}.ms_in1k``, or a timm name) from the Hub."""
    import timm
    name = f"hrnet_w{width}.ms_in1k" if weights is True else str(weights)
    tcfg = timm.models.get_pretrained_cfg(name) if timm.is_model(name.split(".")[0]) else None
    if tcfg is None or not tcfg.hf_hub_id:
        raise ValueError(f"weights_backbone={weights!r}: {name!r} is not a timm HRNet with weights on the "
                         f"Hub (e.g. 'hrnet_w{width}.ms_in1k')")
    return _hub_file(tcfg.hf_hub_id, tcfg.hf_hub_filename or "model.safetensors", None,  # timm's default name
                     cache_dir=cache_dir or hub_cache_dir(), local_files_only=is_offline(local_files_only),
                     force=False, hint=f"On a connected machine run `hrnetdet download --backbone {name}`.")


def load_backbone_weights(model: nn.Module, weights: Union[bool, str], width: int, *,
                          local_files_only: bool = False) -> None:
    """Initialise the model's HRNet from timm's ImageNet weights; timm's classification-only
    modules (incre_modules, final_layer, classifier, ...) are left out."""
    from safetensors.torch import load_file
    path = backbone_weights_file(weights, width, local_files_only=local_files_only)
    body = next(m for m in model.modules() if isinstance(m, HRNet))
    sd = load_file(path, device="cpu")
    own = body.state_dict()
    load_into(body, {k: sd[k] for k in own if k in sd}, path, f"HRNet-W{width}")
    logger.info("initialised the HRNet-W%d backbone from %s (%d timm tensors not used)",
                width, path, len(set(sd) - set(own)))


@functools.lru_cache(maxsize=None)
def class_dependent_keys(arch: str) -> FrozenSet[str]:
    """The state-dict keys whose shapes depend on ``num_classes``: the architecture is built twice
    on the meta device, with two class counts, and the shapes compared."""
    family, width = get_family(arch)
    with torch.device("meta"):
        a, b = (family.build(width, num_classes=n).state_dict() for n in (2, 3))
    return frozenset(k for k in a if k not in b or a[k].shape != b[k].shape)


def load_except_class_layers(model: nn.Module, state_dict: Dict[str, Tensor], source: str, arch: str) -> None:
    """Load everything but the class-dependent layers, which keep the builder's fresh initialisation;
    every other key must fit exactly."""
    skipped = class_dependent_keys(arch)
    own = model.state_dict()
    kept = {k: v for k, v in state_dict.items() if k not in skipped}
    load_into(model, {**kept, **{k: own[k] for k in skipped if k in own}}, source, arch)
    logger.info("%s: loaded %d tensors; %d class-dependent tensors keep a fresh initialisation for "
                "%d classes: %s", source, len(kept), len(skipped),
                len(getattr(model, "categories", [])), ", ".join(sorted(skipped)))
