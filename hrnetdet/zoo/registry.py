"""The model registry: one record per architecture (family x width) and one per weight tag.

Everything else (factories, ``list_models``, ``hubconf.py``, the CLI's model list, MODEL_ZOO.md) is
derived from these records, timm style. Names may carry a weight tag: ``arch.tag``.
"""
import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from torch import nn

from ..detectors.rcnn import IMAGENET_MEAN, IMAGENET_STD
from .coco import COCO_CATEGORIES
from .recipe import RCNN_RECIPE, Recipe


@dataclass(frozen=True)
class Family:
    """A detector family: how to build it and how to convert the reference's checkpoints."""
    name: str                      # "faster_rcnn"
    title: str                     # "Faster R-CNN"
    builder: Callable[..., nn.Module]
    builder_kwargs: Dict[str, Any] = field(default_factory=dict)
    widths: Tuple[int, ...] = (18, 32, 40, 48)
    has_masks: bool = False
    recipe: Recipe = RCNN_RECIPE   # how to train it (engine.train reads it)


@dataclass(frozen=True)
class PretrainedCfg:
    """One published weight set of an architecture (timm's PretrainedCfg, detection flavoured)."""
    arch: str
    tag: str
    reference_file: str            # the reference checkpoint's file name (carries its sha256 prefix)
    metrics: Dict[str, float]      # the reference's published figures (box_ap, mask_ap, ...)
    schedule: str
    multiscale_train: bool = False
    hf_hub_id: Optional[str] = None
    hf_filename: str = "model.safetensors"
    hf_revision: Optional[str] = None  # a full 40-hex commit: downloads are pinned to it
    sha256: Optional[str] = None   # of our converted safetensors file, once published
    parity: Optional[Dict[str, float]] = None  # our measured figures (parity harness), same keys as metrics
    license: str = "Apache-2.0"
    dataset: str = "COCO"
    categories: Tuple[str, ...] = COCO_CATEGORIES
    # What our weights expect: RGB in [0, 1], normalised as (x - mean) / std inside the model.
    input_format: str = "RGB"
    mean: Tuple[float, ...] = IMAGENET_MEAN
    std: Tuple[float, ...] = IMAGENET_STD

    @property
    def name(self) -> str:
        return f"{self.arch}.{self.tag}"

    @property
    def reference_dir(self) -> str:
        return re.sub(r"_\d{8}(_\d{6})?-[0-9a-f]{8}\.pth$", "", self.reference_file)

    @property
    def reference_url(self) -> str:
        return self.reference_url_at(REFERENCE_URL_ROOT)

    def reference_url_at(self, root: str) -> str:
        """The reference checkpoint's URL under another root (a mirror)."""
        return f"{root.rstrip('/')}/{self.reference_dir}/{self.reference_file}"

    @property
    def reference_input_format(self) -> str:
        """The channel order the reference checkpoint was trained on: BGR where converting it flips
        the first convolution's input channels (FCOS, spec §3.7), else RGB."""
        from .convert import REFERENCE_LAYOUTS, flip_input_channels
        family = get_family(self.arch)[0].name
        rules = REFERENCE_LAYOUTS[family][0] if family in REFERENCE_LAYOUTS else []
        return "BGR" if any(fn is flip_input_channels for _, _, fn in rules) else "RGB"

    @property
    def reference_sha256_prefix(self) -> str:
        return re.search(r"-([0-9a-f]{8})\.pth$", self.reference_file).group(1)


REFERENCE_URL_ROOT = "https://download.openmmlab.com/mmdetection/v2.0/hrnet"

_families: Dict[str, Family] = {}
_archs: Dict[str, Tuple[Family, int]] = {}
_pretrained: Dict[str, List[PretrainedCfg]] = {}


def arch_name(family: str, width: int) -> str:
    return f"{family}_hrnetv2p_w{width}"


def register_family(family: Family) -> Family:
    if family.name in _families:
        raise ValueError(f"family {family.name!r} is already registered")
    _families[family.name] = family
    for w in family.widths:
        _archs[arch_name(family.name, w)] = (family, w)
    return family


def register_pretrained(cfg: PretrainedCfg) -> None:
    if cfg.arch not in _archs:
        raise ValueError(f"weights {cfg.name!r} name an unknown architecture {cfg.arch!r}")
    tags = _pretrained.setdefault(cfg.arch, [])
    if any(c.tag == cfg.tag for c in tags):
        raise ValueError(f"weights {cfg.name!r} are already registered")
    tags.append(cfg)


def split_name(name: str) -> Tuple[str, Optional[str]]:
    arch, _, tag = name.partition(".")
    return arch, (tag or None)


def get_family(arch: str) -> Tuple[Family, int]:
    if arch not in _archs:
        raise ValueError(f"unknown model {arch!r}; hrnetdet.list_models() lists the known ones")
    return _archs[arch]


def get_arch_pretrained_cfgs(arch: str) -> List[PretrainedCfg]:
    """Every published weight record of an architecture."""
    get_family(arch)
    return list(_pretrained.get(arch, []))


def get_pretrained_cfg(name: str) -> Optional[PretrainedCfg]:
    """The record of ``arch.tag``; for a bare ``arch``, its default (best box AP) weights or None."""
    arch, tag = split_name(name)
    cfgs = get_arch_pretrained_cfgs(arch)
    if tag is None:
        return max(cfgs, key=lambda c: c.metrics.get("box_ap", 0.0)) if cfgs else None
    for c in cfgs:
        if c.tag == tag:
            return c
    known = ", ".join(c.tag for c in cfgs) or "none"
    raise ValueError(f"model {arch!r} has no weight tag {tag!r} (known tags: {known})")


def list_models(pattern: str = "", pretrained: bool = False, family: str = "") -> List[str]:
    """Architecture names matching a wildcard ``pattern``; with ``pretrained=True``, every
    ``arch.tag`` that has published weights instead."""
    if pretrained:
        names = [c.name for cfgs in _pretrained.values() for c in cfgs]
    else:
        names = list(_archs)
    if family:
        names = [n for n in names if _archs[split_name(n)[0]][0].name == family]
    if pattern:
        names = [n for n in names if fnmatch.fnmatch(n, pattern)]
    return sorted(names, key=_natural_key)


def list_families() -> List[Family]:
    return list(_families.values())


def _natural_key(s: str) -> List[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]
