"""Native HRNet backbone (HRNetV2p body), laid out so that parameter names equal mmdetection's
``backbone.*`` checkpoint keys and timm's ``hrnet_w*`` weights.

A two-conv stem, one Bottleneck stage, then three multi-resolution stages whose modules exchange
information between all branches. Output: four maps at strides 4, 8, 16 and 32. See
docs/NUMERICS.md, 'HRNet backbone'.
"""
from typing import List, Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample if downsample is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample if downsample is not None else nn.Identity()
        self.grad_checkpointing = False

    def forward(self, x: Tensor) -> Tensor:
        if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
            return self._recomputed(x)
        return self._forward(x)

    @torch.jit.unused
    def _recomputed(self, x: Tensor) -> Tensor:
        """Only the input is kept; the block runs again in the backward pass."""
        return checkpoint(self._forward, x, use_reentrant=False)

    def _forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.downsample(x))


def _conv_bn(cin: int, cout: int, kernel: int, stride: int, relu: bool) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _make_layer(block, inplanes: int, planes: int, blocks: int) -> nn.Sequential:
    downsample = None
    if inplanes != planes * block.expansion:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes * block.expansion, 1, bias=False),
            nn.BatchNorm2d(planes * block.expansion),
        )
    layers = [block(inplanes, planes, downsample=downsample)]
    layers += [block(planes * block.expansion, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class HRModule(nn.Module):
    """One multi-resolution module: per-branch BasicBlocks, then every output branch sums all inputs
    (finer inputs via strided 3x3 convs, coarser via 1x1 conv + nearest upsampling), then ReLU."""

    def __init__(self, channels: Sequence[int], num_blocks: int = 4):
        super().__init__()
        n = len(channels)
        self.branches = nn.ModuleList(
            _make_layer(BasicBlock, c, c, num_blocks) for c in channels
        )
        self.fuse_layers = nn.ModuleList()
        for i in range(n):
            row = nn.ModuleList()
            for j in range(n):
                if j > i:
                    row.append(nn.Sequential(
                        nn.Conv2d(channels[j], channels[i], 1, bias=False),
                        nn.BatchNorm2d(channels[i]),
                        nn.Upsample(scale_factor=2 ** (j - i), mode="nearest"),
                    ))
                elif j == i:
                    row.append(nn.Identity())
                else:
                    chain = [_conv_bn(channels[j], channels[j], 3, 2, relu=True) for _ in range(i - j - 1)]
                    chain.append(_conv_bn(channels[j], channels[i], 3, 2, relu=False))
                    row.append(nn.Sequential(*chain))
            self.fuse_layers.append(row)
        self.relu = nn.ReLU(inplace=False)
        self.grad_checkpointing = False

    def forward(self, xs: List[Tensor]) -> List[Tensor]:
        if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
            return self._recomputed(xs)
        return self._forward(xs)

    @torch.jit.unused
    def _recomputed(self, xs: List[Tensor]) -> List[Tensor]:
        """Only the inputs are kept; the module runs again in the backward pass."""
        return checkpoint(self._forward, xs, use_reentrant=False)

    def _forward(self, xs: List[Tensor]) -> List[Tensor]:
        xs = [branch(xs[i]) for i, branch in enumerate(self.branches)]
        out: List[Tensor] = []
        for row in self.fuse_layers:
            y = torch.zeros(0)
            for j, fuse in enumerate(row):
                # Summation order j = 0..n-1, as the reference does (matters for float parity).
                y = fuse(xs[j]) if j == 0 else y + fuse(xs[j])
            out.append(self.relu(y))
        return out


class HRNet(nn.Module):
    """HRNetV2 body for detection.

    Args:
        width: base channel count C (18, 32, 40 or 48); branches have C, 2C, 4C, 8C channels.
        norm_eval: keep BatchNorm in eval mode while training (running statistics frozen, affine
            weights still trained), the reference's default.
        frozen_stages: -1 trains everything; 0 freezes the stem; k in 1..4 also freezes stage k and
            all before it (stage 1 is ``layer1``; stage k >= 2 includes ``transition{k-1}``).
    """

    def __init__(self, width: int = 32, norm_eval: bool = True, frozen_stages: int = -1):
        super().__init__()
        if not -1 <= frozen_stages <= 4:
            raise ValueError(f"frozen_stages must be in -1..4, got {frozen_stages}")
        c = width
        self.width = width
        self.norm_eval = norm_eval
        self.frozen_stages = frozen_stages
        self.out_channels = [c, 2 * c, 4 * c, 8 * c]

        self.conv1 = nn.Conv2d(3, 64, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = nn.Conv2d(64, 64, 3, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = _make_layer(Bottleneck, 64, 64, 4)

        self.transition1 = nn.ModuleList([
            _conv_bn(256, c, 3, 1, relu=True),
            nn.Sequential(_conv_bn(256, 2 * c, 3, 2, relu=True)),
        ])
        self.stage2 = nn.Sequential(HRModule([c, 2 * c]))
        self.transition2 = self._new_branch(3, 2 * c, 4 * c)
        self.stage3 = nn.Sequential(*[HRModule([c, 2 * c, 4 * c]) for _ in range(4)])
        self.transition3 = self._new_branch(4, 4 * c, 8 * c)
        self.stage4 = nn.Sequential(*[HRModule([c, 2 * c, 4 * c, 8 * c]) for _ in range(3)])
        self._freeze()

    @staticmethod
    def _new_branch(n: int, cin: int, cout: int) -> nn.ModuleList:
        """Existing branches pass through; the new one is a strided conv on the coarsest input."""
        return nn.ModuleList([nn.Identity() for _ in range(n - 1)]
                             + [nn.Sequential(_conv_bn(cin, cout, 3, 2, relu=True))])

    def _stage_modules(self, k: int) -> List[nn.Module]:
        if k == 0:
            return [self.conv1, self.bn1, self.conv2, self.bn2]
        if k == 1:
            return [self.layer1]
        return [getattr(self, f"transition{k - 1}"), getattr(self, f"stage{k}")]

    def _freeze(self) -> None:
        for k in range(self.frozen_stages + 1):
            for m in self._stage_modules(k):
                m.eval()
                for p in m.parameters():
                    p.requires_grad_(False)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each layer1 Bottleneck's and each HRModule's activations in the backward pass
        instead of keeping them (timm's name for it). With ``norm_eval=False`` the recomputation
        updates BatchNorm's running statistics a second time."""
        for m in self.modules():
            if isinstance(m, (Bottleneck, HRModule)):
                m.grad_checkpointing = enable

    def train(self, mode: bool = True) -> "HRNet":
        super().train(mode)
        self._freeze()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, x: Tensor) -> List[Tensor]:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.layer1(x)
        xs = [t(x) for t in self.transition1]
        for module in self.stage2:
            xs = module(xs)
        # The last transition entry makes the new branch from the coarsest input (written out per
        # stage because TorchScript cannot pass a ModuleList to a helper).
        xs = [t(xs[min(i, len(xs) - 1)]) for i, t in enumerate(self.transition2)]
        for module in self.stage3:
            xs = module(xs)
        xs = [t(xs[min(i, len(xs) - 1)]) for i, t in enumerate(self.transition3)]
        for module in self.stage4:
            xs = module(xs)
        return xs
