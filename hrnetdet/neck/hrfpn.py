"""HRFPN neck: all branches upsampled bilinearly to stride 4 and concatenated, one 1x1
reduction, then a pyramid of average-pooled copies each with its own 3x3 conv. Everything has a
bias; there is no norm and no activation anywhere. See docs/NUMERICS.md, 'HRFPN neck'.
``FastHRFPN`` computes the same function in a cheaper order, for inference."""
from collections import OrderedDict
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class HRFPN(nn.Module):
    """Args:
        in_channels: channels of the four backbone branches (C, 2C, 4C, 8C).
        out_channels: channels of every output level (256 in all reference configs).
        num_outs: number of pyramid levels (5).
        stride: stride of the per-level 3x3 convs; 1 for the R-CNN family (strides 4..64),
            2 for FCOS (strides 8..128).
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256, num_outs: int = 5,
                 stride: int = 1):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"HRFPN stride must be 1 or 2, got {stride}")
        self.in_channels = list(in_channels)
        self.out_channels = out_channels
        self.num_outs = num_outs
        self.stride = stride
        self.reduction_conv = nn.Conv2d(sum(in_channels), out_channels, 1, bias=True)
        self.fpn_convs = nn.ModuleList(
            nn.Conv2d(out_channels, out_channels, 3, stride=stride, padding=1, bias=True)
            for _ in range(num_outs)
        )
        self.strides = [4 * stride * 2 ** i for i in range(num_outs)]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The reference's Caffe2Xavier init: Kaiming-uniform, a=1, zero bias.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)

    def forward(self, xs: List[Tensor]) -> Dict[str, Tensor]:
        feats = [xs[0]]
        for i in range(1, len(xs)):
            feats.append(F.interpolate(xs[i], scale_factor=float(2 ** i), mode="bilinear",
                                       align_corners=False))
        reduced = self.reduction_conv(torch.cat(feats, dim=1))
        out: Dict[str, Tensor] = OrderedDict()
        for i, conv in enumerate(self.fpn_convs):
            level = reduced if i == 0 else F.avg_pool2d(reduced, kernel_size=1 << i, stride=1 << i)
            out[str(i)] = conv(level)
        return out


class HRNetV2p(nn.Module):
    """HRNet body + HRFPN neck: the detectors' backbone, returning ``OrderedDict('0'..'4')`` with
    ``out_channels`` set, as torchvision's detection heads expect."""

    def __init__(self, body: nn.Module, fpn: HRFPN):
        super().__init__()
        self.body = body
        self.fpn = fpn
        self.out_channels = fpn.out_channels
        self.strides = fpn.strides

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        return self.fpn(self.body(x))


class FastHRFPN(HRFPN):
    """HRFPN computed in a cheaper order: the 1x1 reduction is linear and bilinear upsampling
    weights sum to one, so each branch is reduced at its own resolution and upsampled afterwards
    (256 channels at 1/4^i of the pixels instead of C_i channels at full size), and each pooled
    level is pooled from the previous one (equal windows, floor sizes agree)."""

    def forward(self, xs: List[Tensor]) -> Dict[str, Tensor]:
        w = self.reduction_conv.weight
        chunks = w.split(self.in_channels, dim=1)
        reduced = F.conv2d(xs[0], chunks[0], self.reduction_conv.bias)
        for i in range(1, len(xs)):
            part = F.conv2d(xs[i], chunks[i])
            reduced = reduced + F.interpolate(part, scale_factor=float(2 ** i), mode="bilinear",
                                              align_corners=False)
        out: Dict[str, Tensor] = {}
        level = reduced
        for i, conv in enumerate(self.fpn_convs):
            if i > 0:
                level = F.avg_pool2d(level, kernel_size=2, stride=2)
            out[str(i)] = conv(level)
        return out


def use_fast_neck(model: nn.Module) -> nn.Module:
    """Swap the detector's HRFPN for ``FastHRFPN`` with the same weights, in place."""
    backbone = model.backbone
    if type(backbone.fpn) is HRFPN:
        old = backbone.fpn
        new = FastHRFPN(old.in_channels, old.out_channels, old.num_outs, old.stride)
        new.load_state_dict(old.state_dict())
        backbone.fpn = new.to(old.reduction_conv.weight.device).train(old.training)
    return model
