"""The inference fast path computes the same detections as the plain model."""
import copy

import pytest
import torch
from torch import nn

import hrnetdet
from calibrate import calibrate
from hrnetdet.inference import match_detections, optimize_for_inference
from hrnetdet.inference.match import MIN_MATCHED
from hrnetdet.inference.fast import fold_batchnorm
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
