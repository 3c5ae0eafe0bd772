"""Overriding a detector's detection score threshold for a while (prediction at another threshold,
export at 0) and putting it back: through its settings record (``set_settings``) for
hrnetdet's detectors, module by module for others (torchvision's)."""
import contextlib
from typing import Iterator, List, Optional

from torch import nn
from torchvision.models.detection.rpn import RegionProposalNetwork

from ..detectors.settings import DetectorSettings, set_settings


def score_heads(model: nn.Module) -> List[nn.Module]:
    """Every module with a detection score threshold: the box heads (each cascade stage) or FCOS's
    head; the RPN's threshold is its own business."""
    return [m for m in model.modules()
            if hasattr(m, "score_thresh") and not isinstance(m, RegionProposalNetwork)]


def set_score_threshold(model: nn.Module, score_thresh: float) -> float:
    """Set the detection score threshold of every head of ``model`` for good; returns the previous one."""
    if isinstance(getattr(model, "settings", None), DetectorSettings):
        return set_settings(model, score_thresh=score_thresh).score_thresh
    heads = score_heads(model)
    if not heads:
        raise ValueError(f"{type(model).__name__} has no module with a score_thresh to set")
    previous = heads[0].score_thresh
    for m in heads:
        m.score_thresh = float(score_thresh)
    return previous


@contextlib.contextmanager
def score_threshold(model: nn.Module, score_thresh: Optional[float]) -> Iterator[None]:
    """Within the block every head of ``model`` keeps detections scoring above ``score_thresh``
    (``None``: unchanged); the threshold is restored afterwards, also on errors."""
    if score_thresh is None:
        yield
        return
    previous = set_score_threshold(model, score_thresh)
    try:
        yield
    finally:
        set_score_threshold(model, previous)
