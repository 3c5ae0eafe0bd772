"""The model zoo: the registry of families and published weights (imported at once, without torch:
``hrnetdet models`` reads it), and checkpoints, the Hub and ``create_model``, loaded on first use
(PEP 562)."""
import importlib
from typing import Any

from . import models  # noqa: F401  (registers every family and published checkpoint)
from .registry import (get_arch_pretrained_cfgs, get_pretrained_cfg, list_families, list_models,
                       split_name)

_EXPORTS = {"read_checkpoint": "checkpoint", "save_pretrained": "checkpoint", "CheckpointError": "convert",
            "build_factories": "factory", "create_model": "factory"}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hrnetdet.zoo' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


__all__ = ["CheckpointError", "read_checkpoint", "save_pretrained", "build_factories", "create_model",
           "get_arch_pretrained_cfgs", "get_pretrained_cfg", "list_families", "list_models", "split_name"]
