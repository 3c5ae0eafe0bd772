"""IoU assignment as the reference's MaxIoUAssigner does it."""
import torch
from torch import Tensor
from torchvision.models.detection._utils import Matcher


class ReferenceMatcher(Matcher):
    """torchvision's Matcher with the reference's low-quality rule: every prediction whose IoU with a
    ground-truth box equals that box's best IoU is assigned to it, but only when that best IoU is at
    least ``min_pos_iou``; later ground truths win ties, as in the reference's loop."""

    def __init__(self, high_threshold: float, low_threshold: float, min_pos_iou: float = -1.0):
        super().__init__(high_threshold, low_threshold, allow_low_quality_matches=min_pos_iou >= 0)
        self.min_pos_iou = min_pos_iou

    def set_low_quality_matches_(self, matches: Tensor, all_matches: Tensor, match_quality_matrix: Tensor) -> None:
        highest, _ = match_quality_matrix.max(dim=1)
        eligible = (match_quality_matrix == highest[:, None]) & (highest[:, None] >= self.min_pos_iou)
        gt_ids = torch.arange(1, match_quality_matrix.shape[0] + 1, device=matches.device)[:, None]
        last_gt = (eligible.to(gt_ids.dtype) * gt_ids).max(dim=0).values
        update = last_gt > 0
        matches[update] = last_gt[update] - 1
