from . import models  # noqa: F401  (registers every family and published checkpoint)
from .checkpoint import read_checkpoint, save_pretrained
from .convert import CheckpointError
from .factory import build_factories, create_model
from .registry import (get_arch_pretrained_cfgs, get_pretrained_cfg, list_families, list_models,
                       split_name)

__all__ = ["CheckpointError", "read_checkpoint", "save_pretrained", "build_factories", "create_model",
           "get_arch_pretrained_cfgs", "get_pretrained_cfg", "list_families", "list_models", "split_name"]
