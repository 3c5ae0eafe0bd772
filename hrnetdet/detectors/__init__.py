"""The detectors: two-stage (Faster/Mask R-CNN), cascades (Cascade, Cascade Mask R-CNN, HTC) and
FCOS, each a builder composing backbone, neck and heads from a settings record (``settings.py``).
The builders load on first use (PEP 562), so that the settings records import no torch."""
import importlib
from typing import Any

_EXPORTS = {"FCOSDetector": "fcos", "build_fcos": "fcos", "HRNetDetector": "rcnn", "build_rcnn": "rcnn",
            "build_cascade_rcnn": "cascade", "build_htc": "cascade"}


def has_masks(model: Any) -> bool:
    """Whether a detector (hrnetdet's or torchvision's) predicts instance masks: torchvision's
    ``roi_heads.has_mask()`` contract, which FCOS, having no RoI heads, answers no to."""
    roi_heads = getattr(model, "roi_heads", None)
    return roi_heads is not None and bool(roi_heads.has_mask())


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hrnetdet.detectors' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


__all__ = ["FCOSDetector", "HRNetDetector", "build_cascade_rcnn", "build_fcos", "build_htc", "build_rcnn",
           "has_masks"]
