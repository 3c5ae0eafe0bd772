"""Multi-level RoIAlign as the reference's SingleRoIExtractor: aligned=True,
adaptive sampling, fixed strides and the finest-scale-56 level mapping.
See docs/NUMERICS.md, 'RoIAlign'."""
from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align


def map_roi_levels(boxes: Tensor, num_levels: int, finest_scale: float = 56.0) -> Tensor:
    """Level of each box: floor(log2(sqrt(w*h) / finest_scale + 1e-6)), clamped to the levels."""
    scale = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    levels = torch.floor(torch.log2(scale / finest_scale + 1e-6))
    return levels.clamp(min=0, max=num_levels - 1).long()


class ReferenceRoIAlign(nn.Module):
    """Drop-in for torchvision's MultiScaleRoIAlign, with the reference's numerics.

    Args:
        featmap_names: the feature maps to pool from, finest first.
        output_size: output side (7 for boxes, 14 for masks).
        strides: the stride of each named map.
    """

    def __init__(self, featmap_names: Sequence[str], output_size: int,
                 strides: Sequence[int] = (4, 8, 16, 32), sampling_ratio: int = 0,
                 finest_scale: float = 56.0):
        super().__init__()
        if len(featmap_names) != len(strides):
            raise ValueError(f"{len(featmap_names)} feature maps for {len(strides)} strides")
        self.featmap_names = list(featmap_names)
        self.output_size = (int(output_size), int(output_size))
        self.strides = [float(s) for s in strides]
        self.sampling_ratio = sampling_ratio
        self.finest_scale = finest_scale

    def forward(self, x: Dict[str, Tensor], boxes: List[Tensor],
                image_shapes: List[Tuple[int, int]]) -> Tensor:
        feats = [x[name] for name in self.featmap_names]
        ref = feats[0]
        rois = torch.cat([
            torch.cat([torch.full_like(b[:, :1], float(i)), b], dim=1) for i, b in enumerate(boxes)
        ], dim=0).to(ref.dtype)
        out = ref.new_zeros((rois.shape[0], ref.shape[1]) + self.output_size)
        if rois.shape[0] == 0:
            return out
        levels = map_roi_levels(rois[:, 1:], len(feats), self.finest_scale)
        for lvl, (feat, stride) in enumerate(zip(feats, self.strides)):
            idx = torch.where(levels == lvl)[0]
            if idx.numel() == 0:
                continue
            pooled = roi_align(feat, rois[idx], self.output_size, spatial_scale=1.0 / stride,
                               sampling_ratio=self.sampling_ratio, aligned=True)
            out[idx] = pooled.to(out.dtype)
        return out
