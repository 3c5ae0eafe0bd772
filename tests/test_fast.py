"""The inference fast path computes the same detections as the plain model."""
import copy

import pytest
import torch
from torch import nn

import hrnetdet
from calibrate import calibrate
from hrnetdet.inference import fold_batchnorm, match_detections, optimize_for_inference
from hrnetdet.inference.match import MIN_MATCHED
from hrnetdet.inference.winograd import WinogradConv2d, use_winograd
from hrnetdet.neck.hrfpn import FastHRFPN
from hrnetdet.neck import HRFPN

SMALL = dict(min_size=128, max_size=192, rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=100)


def test_fold_batchnorm_removes_every_norm_and_keeps_features():
    torch.manual_seed(0)
    body = hrnetdet.create_model("faster_rcnn_hrnetv2p_w18").backbone.body.eval()
    for m in body.modules():  # non-trivial statistics, so that folding has something to fold
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in body.modules())
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        ref = body(x)
        assert fold_batchnorm(body) == n_bn
        assert not any(isinstance(m, nn.BatchNorm2d) for m in body.modules())
        out = body(x)
    for r, o in zip(ref, out):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4 * float(r.abs().max()))


@pytest.mark.parametrize("stride", [1, 2])
def test_fast_hrfpn_equals_hrfpn(stride):
    torch.manual_seed(0)
    chans = [18, 36, 72, 144]
    ref = HRFPN(chans, 256, stride=stride).eval()
    fast = FastHRFPN(chans, 256, stride=stride).eval()
    fast.load_state_dict(ref.state_dict())
    xs = [torch.randn(1, c, 40 // 2 ** i, 56 // 2 ** i) for i, c in enumerate(chans)]
    with torch.no_grad():
        a, b = ref(xs), fast(xs)
    assert list(a) == list(b)
    for k in a:
        assert a[k].shape == b[k].shape
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-4 * float(a[k].abs().max()))


@pytest.mark.parametrize("arch,compiled", [
    ("faster_rcnn_hrnetv2p_w18", False),
    ("mask_rcnn_hrnetv2p_w18", False),
    # needs a C++ compiler (inductor) and 15-60 s of compiling
    pytest.param("faster_rcnn_hrnetv2p_w18", True, marks=pytest.mark.slow),
])
def test_fast_path_parity(arch, compiled, rocket):
    """>= 98% of the plain model's detections found again with box IoU >= 0.98, score within 0.01."""
    torch.manual_seed(0)
    model = calibrate(hrnetdet.create_model(arch, **SMALL), [rocket])
    fast = optimize_for_inference(copy.deepcopy(model), compile=compiled)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.backbone.modules())
    assert fast.backbone.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref, out = model([rocket])[0], fast([rocket])[0]
    assert len(ref["scores"]) == 100  # calibrated weights and score threshold 0: a full set
    stats = match_detections(ref, out)
    assert stats["matched_frac"] >= MIN_MATCHED, stats
    if "masks" in ref:
        assert out["masks"].shape == ref["masks"].shape


@pytest.mark.parametrize("batch,cin,cout,height,width,bias", [
    (2, 160, 160, 13, 22, True), (1, 160, 192, 8, 8, False), (1, 256, 160, 1, 5, True), (3, 160, 160, 7, 4, False)])
def test_winograd_conv_matches_conv2d(batch, cin, cout, height, width, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=bias)
    x = torch.randn(batch, cin, height, width)
    with torch.no_grad():
        expected, out = conv(x), WinogradConv2d(conv)(x)
    assert out.shape == expected.shape
    assert ((out - expected).abs().max() / expected.abs().max()).item() < 1e-4


def test_use_winograd_swaps_only_wide_3x3_stride_1_convolutions():
    model = nn.Sequential(nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(),
                          nn.Sequential(nn.Conv2d(256, 160, 3, padding=1, bias=False)),
                          nn.Conv2d(160, 144, 3, padding=1), nn.Conv2d(144, 256, 3, padding=1),
                          nn.Conv2d(256, 256, 3, stride=2, padding=1), nn.Conv2d(256, 256, 1),
                          nn.Conv2d(256, 256, 3, padding=2, dilation=2), nn.Conv2d(256, 256, 3, padding=1, groups=2))
    x = torch.randn(1, 256, 10, 12)
    with torch.no_grad():
        expected = model(x)
        assert use_winograd(model) == 2
        out = model(x)
    assert isinstance(model[0], WinogradConv2d) and isinstance(model[2][0], WinogradConv2d)
    assert all(type(m) is nn.Conv2d for m in list(model)[3:])
    assert ((out - expected).abs().max() / expected.abs().max()).item() < 1e-4
    with pytest.raises(ValueError, match="3x3, stride-1"):
        WinogradConv2d(model[5])
