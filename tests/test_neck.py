"""HRFPN against the reference's operations and level sizes (docs/NUMERICS.md, 'HRFPN neck')."""
import pytest
import torch
import torch.nn.functional as F

from hrnetdet.neck import HRFPN


def _branches(c, h, w):
    return [torch.randn(1, c * 2 ** i, h // 2 ** i, w // 2 ** i) for i in range(4)]


@pytest.mark.parametrize("stride,sizes", [
    (1, [(200, 304), (100, 152), (50, 76), (25, 38), (12, 19)]),
    (2, [(100, 152), (50, 76), (25, 38), (13, 19), (6, 10)]),
])
def test_level_sizes_for_800x1216(stride, sizes):
    neck = HRFPN([18, 36, 72, 144], 8, stride=stride)
    with torch.no_grad():
        out = neck(_branches(18, 200, 304))
    assert list(out) == ["0", "1", "2", "3", "4"]
    assert [tuple(v.shape[-2:]) for v in out.values()] == sizes
    assert neck.strides == [4 * stride * 2 ** i for i in range(5)]


def test_forward_is_the_reference_formula():
    neck = HRFPN([4, 8, 16, 32], 6, stride=1)
    xs = _branches(4, 16, 24)
    ups = [xs[0]] + [F.interpolate(x, scale_factor=2 ** i, mode="bilinear", align_corners=False)
                     for i, x in enumerate(xs) if i > 0]
    reduced = F.conv2d(torch.cat(ups, 1), neck.reduction_conv.weight, neck.reduction_conv.bias)
    with torch.no_grad():
        out = neck(xs)
        for i in range(5):
            pooled = reduced if i == 0 else F.avg_pool2d(reduced, 2 ** i, 2 ** i)
            conv = neck.fpn_convs[i]
            torch.testing.assert_close(out[str(i)], F.conv2d(pooled, conv.weight, conv.bias, padding=1))
    # every conv has a bias and the levels do not share weights
    assert all(c.bias is not None for c in neck.fpn_convs)
    assert neck.fpn_convs[0].weight.data_ptr() != neck.fpn_convs[1].weight.data_ptr()


def test_bad_stride():
    with pytest.raises(ValueError, match="stride"):
        HRFPN([18, 36, 72, 144], stride=4)
