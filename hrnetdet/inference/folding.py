"""Batch norms folded into the convolutions before them: the same function in one pass instead of
two, for the fast path and the exported graphs."""
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.models.resnet import Bottleneck as ResNetBottleneck
from torchvision.models.resnet import ResNet
from torchvision.ops.misc import FrozenBatchNorm2d

from ..backbone.hrnet import BasicBlock, Bottleneck, HRNet


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)) and not m.training


def fold_batchnorm(body: nn.Module) -> int:
    """Fold each eval-mode batch norm of an HRNet (or torchvision ResNet) body into the convolution
    feeding it; the norm becomes an Identity. Returns the number of folded norms.

    Folds ``convK``/``bnK`` attribute pairs of the blocks and stems, which apply ``bnK`` directly
    to ``convK``'s output, and conv-norm neighbours in every ``nn.Sequential``."""
    folded = 0
    for m in body.modules():
        if isinstance(m, (HRNet, BasicBlock, Bottleneck, ResNet, ResNetBottleneck)):
            for k in (1, 2, 3):
                conv, bn = getattr(m, f"conv{k}", None), getattr(m, f"bn{k}", None)
                if isinstance(conv, nn.Conv2d) and bn is not None and _is_norm(bn):
                    setattr(m, f"conv{k}", fuse_conv_bn_eval(conv, bn))
                    setattr(m, f"bn{k}", nn.Identity())
                    folded += 1
        elif isinstance(m, nn.Sequential):
            for i in range(len(m) - 1):
                if isinstance(m[i], nn.Conv2d) and _is_norm(m[i + 1]):
                    m[i] = fuse_conv_bn_eval(m[i], m[i + 1])
                    m[i + 1] = nn.Identity()
                    folded += 1
    return folded
