"""The model registry: one record per architecture (family x width) and one per weight tag.

Everything else (factories, ``list_models``, ``hubconf.py``, the CLI's model list, MODEL_ZOO.md) is
derived from these records, timm style. Names may carry a weight tag: ``arch.tag``.
"""
import fnmatch
import re
from typing import Any, Dict, List, Optional, Tuple

from ..names import split_name
from .records import Family, PretrainedCfg, arch_name

_families: Dict[str, Family] = {}
_archs: Dict[str, Tuple[Family, int]] = {}
_pretrained: Dict[str, List[PretrainedCfg]] = {}


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
