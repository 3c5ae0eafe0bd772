"""The detectors: two-stage (Faster/Mask R-CNN), cascades (Cascade, Cascade Mask R-CNN, HTC) and
FCOS, each a builder composing backbone, neck and heads."""
from torch import nn

from .cascade import build_cascade_rcnn, build_htc
from .fcos import FCOSDetector, build_fcos
from .rcnn import HRNetDetector, build_rcnn


def has_masks(model: nn.Module) -> bool:
    """Whether a detector (hrnetdet's or torchvision's) predicts instance masks: torchvision's
    ``roi_heads.has_mask()`` contract, which FCOS, having no RoI heads, answers no to."""
    roi_heads = getattr(model, "roi_heads", None)
    return roi_heads is not None and bool(roi_heads.has_mask())


__all__ = ["FCOSDetector", "HRNetDetector", "build_cascade_rcnn", "build_fcos", "build_htc", "build_rcnn",
           "has_masks"]
