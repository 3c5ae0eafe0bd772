"""Detection heads in torchvision's style with the reference's numerics: anchors, RPN, RoI align,
box/mask RoI heads, cascade and HTC heads, the semantic branch and FCOS."""
from .cascade import CascadeRoIHeads, CascadeStage
from .fcos import FCOSHead
from .roi_heads import StandardRoIHeads
from .rpn import ReferenceRPN

__all__ = ["CascadeRoIHeads", "CascadeStage", "FCOSHead", "ReferenceRPN", "StandardRoIHeads"]
