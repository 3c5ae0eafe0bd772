"""HTC's fused semantic branch: a stride-8 segmentation head over all HRFPN levels whose
embedding is pooled into every box and mask RoI feature. See docs/NUMERICS.md, 'HTC semantic
branch'."""
import logging
from typing import Dict, Final, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops.misc import Conv2dNormActivation

logger = logging.getLogger("hrnetdet")

# A training target's (H, W) integer map of stuff and thing classes (0..182 for COCO-stuff,
# 255 = ignore), in the same coordinates as the image; the transform resizes it with nearest
# neighbour, as the reference does its ``gt_semantic_seg``.
SEMANTIC_KEY = "semantic_seg"
IGNORE_INDEX = 255


def conv_relu(in_channels: int, out_channels: int, kernel_size: int) -> Conv2dNormActivation:
    """The reference's ConvModule without a norm: conv with bias, then ReLU."""
    return Conv2dNormActivation(in_channels, out_channels, kernel_size, norm_layer=None)


class FusedSemanticHead(nn.Module):
    """The reference's FusedSemanticHead: each level is resized to the fusion level (bilinear,
    align_corners=True), passed through its own 1x1 conv + ReLU and summed; then 3x3 convs,
    ``conv_logits`` (the segmentation, for the loss) and ``conv_embedding`` (the fused feature).

    Args:
        num_ins: number of input levels (HRFPN's 5).
        fusion_level: the level whose resolution the output has (1 = stride 8).
        num_classes: segmentation classes (COCO-stuff: 183).
        stride: the fusion level's stride (8).
        loss_weight: weight of the cross-entropy loss (0.2).
    """

    fusion_level: Final[int]

    def __init__(self, num_ins: int = 5, fusion_level: int = 1, num_convs: int = 4,
                 channels: int = 256, num_classes: int = 183, stride: int = 8, loss_weight: float = 0.2):
        super().__init__()
        self.fusion_level = fusion_level
        self.stride = stride
        self.loss_weight = loss_weight
        self.lateral_convs = nn.ModuleList(conv_relu(channels, channels, 1) for _ in range(num_ins))
        self.convs = nn.ModuleList(conv_relu(channels, channels, 3) for _ in range(num_convs))
        self.conv_embedding = conv_relu(channels, channels, 1)
        self.conv_logits = nn.Conv2d(channels, num_classes, 1)
        self._warned = False

    def forward(self, feats: List[Tensor]) -> Tuple[Tensor, Tensor]:
        """Returns (segmentation logits, semantic feature), both at the fusion level's stride."""
        x = self.lateral_convs[self.fusion_level](feats[self.fusion_level])
        size = x.shape[-2:]
        # A loop over the module list: TorchScript indexes one only with literals and constants.
        for i, lateral in enumerate(self.lateral_convs):
            if i != self.fusion_level:
                x = x + lateral(F.interpolate(feats[i], size=size, mode="bilinear", align_corners=True))
        for conv in self.convs:
            x = conv(x)
        return self.conv_logits(x), self.conv_embedding(x)

    @torch.jit.unused  # training only, and it logs
    def loss(self, logits: Tensor, targets: List[Dict[str, Tensor]]) -> Optional[Tensor]:
        """Weighted cross-entropy against ``labels``, averaged over the non-ignored pixels (mmdetection
        2.0's FusedSemanticHead, which trained the published models; 3.x averages over every pixel).
        ``None`` when no target has a map."""
        labels = self.labels(logits, targets)
        if labels is None:
            return None
        if not (labels != IGNORE_INDEX).any():
            return logits.sum() * 0
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX) * self.loss_weight

    @torch.jit.unused
    def labels(self, logits: Tensor, targets: List[Dict[str, Tensor]]) -> Optional[Tensor]:
        """The targets' ``semantic_seg`` maps, padded with the ignore value to the padded batch and
        downscaled to the logits' size with nearest neighbour (the reference's Pad + SegRescale).
        Images without a map are ignored; ``None`` when none has one."""
        if not any(SEMANTIC_KEY in t for t in targets):
            if not self._warned:
                logger.warning("HTC: targets carry no %r maps; training without the semantic loss",
                               SEMANTIC_KEY)
                self._warned = True
            return None
        h, w = logits.shape[-2] * self.stride, logits.shape[-1] * self.stride
        maps = logits.new_full((len(targets), 1, h, w), IGNORE_INDEX)
        for i, t in enumerate(targets):
            if SEMANTIC_KEY in t:
                seg = t[SEMANTIC_KEY]
                if seg.dim() != 2 or seg.shape[0] > h or seg.shape[1] > w:
                    raise ValueError(f"target {i}: {SEMANTIC_KEY!r} must be an (H, W) map of the image's "
                                     f"size, got shape {tuple(seg.shape)} for a batch padded to {h}x{w}")
                maps[i, 0, :seg.shape[0], :seg.shape[1]] = seg.to(maps.dtype)
        return F.interpolate(maps, size=logits.shape[-2:], mode="nearest")[:, 0].long()
