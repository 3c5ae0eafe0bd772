"""Winograd F(4x4, 3x3) for the wide 3x3 convolutions of the exported graphs.

Neither onnxruntime's nor OpenVINO's CPU convolutions use a Winograd algorithm, and the wide 3x3
convolutions of an HRNet detector (HRFPN's and the RPN/FCOS/semantic heads' 256-channel ones,
HRNet-W40/W48's widest branches) already run near the core's fp32 peak there. Written as graph
operations (an input-transform convolution, 36 matrix products, an output transform), F(4x4, 3x3)
does a quarter of their multiplications; the transforms are extra passes over memory, which pay
off from about 160 channels on feature maps (benchmarks/export_results.md) but not for the narrow
branches or for the RoI heads' 14x14 maps. Relative error: about 2e-5 of the output's largest value;
see docs/NUMERICS.md, 'Winograd convolutions'.
"""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Lavin and Gray (2016): Y = A^T [(G g G^T) * (B^T d B)] A on 6x6 tiles, 4x4 outputs each.
_BT = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
       [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]
_G = [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
      [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]
_AT = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]
MIN_CHANNELS = 160


class WinogradConv2d(nn.Module):
    """``conv`` (3x3, stride 1, padding 1, no dilation or groups) as Winograd F(4x4, 3x3).

    The weights are transformed once, in float64; the forward pass is an input-transform
    convolution over 6x6 tiles at stride 4, a batched matrix product per tile position and an
    output transform, all in the input's dtype."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if not is_winograd_eligible(conv, min_channels=1):
            raise ValueError(f"not a 3x3, stride-1, padding-1 dense convolution: {conv}")
        bt, g, at = (torch.tensor(m, dtype=torch.float64) for m in (_BT, _G, _AT))
        w = conv.weight.detach().double()
        dtype = conv.weight.dtype
        self.out_channels = conv.out_channels
        self.register_buffer("weight", torch.einsum("ia,kcab,jb->ijkc", g, w, g).reshape(36, *w.shape[:2]).to(dtype))
        self.register_buffer("input_transform", torch.einsum("ia,jb->ijab", bt, bt).reshape(36, 1, 6, 6).to(dtype))
        self.register_buffer("output_transform", torch.einsum("pi,qj->pqij", at, at).reshape(16, 36).to(dtype))
        bias = conv.bias.detach().clone() if conv.bias is not None else torch.zeros(conv.out_channels, dtype=dtype)
        self.register_buffer("bias", bias)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        th, tw = (h + 3) // 4, (w + 3) // 4
        x = F.pad(x, (1, 4 * tw - w + 1, 1, 4 * th - h + 1)).reshape(n * c, 1, 4 * th + 2, 4 * tw + 2)
        v = F.conv2d(x, self.input_transform, stride=4).reshape(n, c, 36, th * tw).transpose(1, 2)
        m = torch.matmul(self.weight, v).reshape(n, 36, self.out_channels * th * tw)
        y = torch.matmul(self.output_transform, m).reshape(n, 4, 4, self.out_channels, th, tw)
        y = y.permute(0, 3, 4, 1, 5, 2).reshape(n, self.out_channels, 4 * th, 4 * tw)
        return y[:, :, :h, :w] + self.bias[None, :, None, None]


def is_winograd_eligible(m: nn.Module, min_channels: int = MIN_CHANNELS) -> bool:
    return (isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and m.stride == (1, 1)
            and m.padding == (1, 1) and m.dilation == (1, 1) and m.groups == 1 and m.padding_mode == "zeros"
            and min(m.in_channels, m.out_channels) >= min_channels)


def use_winograd(module: nn.Module, min_channels: int = MIN_CHANNELS) -> int:
    """Swap every eligible convolution inside ``module`` for its ``WinogradConv2d``, in place;
    returns the number swapped. Fold batch norms first, so that they do not stay separate passes."""
    swapped = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if is_winograd_eligible(child, min_channels):
                setattr(parent, name, WinogradConv2d(child))
                swapped += 1
    return swapped
