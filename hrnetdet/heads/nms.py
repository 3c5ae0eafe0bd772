"""Class-wise NMS with the reference's arithmetic (mmcv ``batched_nms``).

mmcv separates the classes by shifting each box by ``class * (max coordinate + 1)`` in the boxes'
own dtype and runs one NMS on the shifted boxes; above 10,000 boxes it runs that NMS class by class,
still on the shifted boxes. torchvision's ``batched_nms`` instead runs unshifted per-class NMS above
4,000 elements (1,000 boxes) on the CPU and 100,000 on the GPU. In float32 a shift of ~30,000 px rounds coordinates to a
0.002 px grid, so the two disagree on box pairs whose IoU is within ~1e-4 of the threshold. HTC's score
threshold of 0.001 sends ~20,000 candidates into the final NMS, where such pairs occur, and one flipped
pair changes which further boxes survive. Doing the shift as the reference does keeps its decisions.
"""
import torch
from torch import Tensor
from torchvision.ops import nms


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float,
                split_threshold: int = 10000) -> Tensor:
    """Indices of the kept boxes, by decreasing score; ``idxs`` is each box's class (or level).
    From ``split_threshold`` boxes up (mmcv's ``split_thr``) the NMS runs class by class: faster,
    and the kept set is the same. Half-precision boxes and scores are compared in float32: a class
    shift of ~100,000 px is past float16's range and on a 512-px grid in bfloat16."""
    boxes, scores = boxes.float(), scores.float()
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    offsets = idxs.to(boxes) * (boxes.max() + torch.tensor(1).to(boxes))
    shifted = boxes + offsets[:, None]
    if boxes.shape[0] < split_threshold:
        return nms(shifted, scores, iou_threshold)
    # The shifted classes are disjoint, so per-class NMS keeps exactly what one NMS would.
    kept = torch.zeros_like(scores, dtype=torch.bool)
    for c in torch.unique(idxs):
        members = torch.where(idxs == c)[0]
        kept[members[nms(shifted[members], scores[members], iou_threshold)]] = True
    keep = torch.where(kept)[0]
    return keep[scores[keep].sort(descending=True)[1]]
