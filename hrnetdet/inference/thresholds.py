"""Overriding a detector's detection score threshold for a while (prediction at another threshold,
export at 0) and putting it back: through its settings record (``temporary_settings``) for
hrnetdet's detectors, module by module for others (torchvision's)."""
import contextlib
from typing import Iterator, List, Optional

from torch import nn
from torchvision.models.detection.rpn import RegionProposalNetwork

from ..detectors.settings import DetectorSettings, temporary_settings


def score_heads(model: nn.Module) -> List[nn.Module]:
    """Every module with a detection score threshold: the box heads (each cascade stage) or FCOS's
    head; the RPN's threshold is its own business."""
    return [m for m in model.modules()
            if hasattr(m, "score_thresh") and not isinstance(m, RegionProposalNetwork)]


@contextlib.contextmanager
def score_threshold(model: nn.Module, score_thresh: Optional[float]) -> Iterator[None]:
    """Within the block every head of ``model`` keeps detections scoring above ``score_thresh``
    (``None``: unchanged); the thresholds are restored afterwards, also on errors."""
    if isinstance(getattr(model, "settings", None), DetectorSettings):
        with temporary_settings(model, score_thresh=score_thresh):
            yield
        return
    heads = score_heads(model)
    if score_thresh is not None and not heads:
        raise ValueError(f"{type(model).__name__} has no module with a score_thresh to set")
    saved = [m.score_thresh for m in heads]
    try:
        if score_thresh is not None:
            for m in heads:
                m.score_thresh = float(score_thresh)
        yield
    finally:
        for m, t in zip(heads, saved):
            m.score_thresh = t
