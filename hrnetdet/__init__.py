"""hrnetdet: HRNetV2p object detectors in torchvision's contract, with the reference's weights.

Attributes load on first use (PEP 562), so ``hrnetdet --help`` and ``hrnetdet.__version__`` do not
import torch."""
import importlib

from .version import __version__

_EXPORTS = {"CheckpointError": "hrnetdet.zoo", "create_model": "hrnetdet.zoo",
            "get_arch_pretrained_cfgs": "hrnetdet.zoo", "get_pretrained_cfg": "hrnetdet.zoo",
            "list_families": "hrnetdet.zoo", "list_models": "hrnetdet.zoo", "save_pretrained": "hrnetdet.zoo",
            "Callback": "hrnetdet.engine.callbacks", "evaluate": "hrnetdet.engine.evaluate",
            "fit": "hrnetdet.engine.train",
            "optimize_for_inference": "hrnetdet.inference", "predict": "hrnetdet.inference",
            "draw": "hrnetdet.visualize", "set_settings": "hrnetdet.detectors.settings",
            "temporary_settings": "hrnetdet.detectors.settings", "model_settings": "hrnetdet.detectors.settings",
            "Client": "hrnetdet.serve.client"}


def _factories() -> dict:
    """One ``<family>_hrnetv2p_w<width>`` factory per registered architecture."""
    return importlib.import_module("hrnetdet.zoo").build_factories()


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name == "__all__":
        value = ["__version__", *_EXPORTS, *_factories()]
    else:
        # only factory-shaped names (records.arch_name) load the zoo: ``from hrnetdet import cli``
        # and hasattr() probes ask for other names first and must not import torch
        factories = _factories() if "_hrnetv2p_w" in name else {}
        if name not in factories:
            raise AttributeError(f"module 'hrnetdet' has no attribute {name!r}")
        globals().update(factories)
        return factories[name]
    globals()[name] = value
    return value


def __dir__():
    return sorted({*globals(), *__getattr__("__all__")})
