"""hrnetdet: HRNetV2p object detectors in torchvision's contract, with the reference's weights."""
from .zoo import (CheckpointError, create_model, get_arch_pretrained_cfgs, get_pretrained_cfg,
                  list_families, list_models)
from .zoo import build_factories as _build_factories
from .engine.evaluate import evaluate
from .engine.train import fit
from .inference import optimize_for_inference, predict
from .visualize import draw

__version__ = "0.1.0"

_factories = _build_factories()
globals().update(_factories)

__all__ = ["CheckpointError", "create_model", "draw", "evaluate", "fit", "get_arch_pretrained_cfgs", "get_pretrained_cfg",
           "list_families", "list_models", "optimize_for_inference", "predict", *_factories]
