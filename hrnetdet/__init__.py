"""hrnetdet: HRNetV2p object detectors in torchvision's contract, with the reference's weights."""
from .zoo import (CheckpointError, create_model, get_arch_pretrained_cfgs, get_pretrained_cfg,
                  list_families, list_models, save_pretrained)
from .zoo import build_factories as _build_factories
from .engine.evaluate import evaluate
from .inference import optimize_for_inference, predict
from .version import __version__
from .visualize import draw

_factories = _build_factories()
globals().update(_factories)

__all__ = ["__version__", "CheckpointError", "create_model", "draw", "evaluate", "get_arch_pretrained_cfgs", "get_pretrained_cfg",
           "list_families", "list_models", "optimize_for_inference", "predict", "save_pretrained", *_factories]
