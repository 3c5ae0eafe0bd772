"""Half precision (autocast): the layers may run in float16/bfloat16, the box arithmetic may not.
The oracle is the same computation on the same values in float32."""
import pytest
import torch
from torchvision.models.detection.image_list import ImageList

import hrnetdet
from hrnetdet.heads.anchors import ReferenceAnchorGenerator

SMALL = dict(min_size=96, max_size=128, rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50)


def test_anchors_are_float32_for_half_features():
    gen = ReferenceAnchorGenerator()
    sizes = [(200, 304), (100, 152), (50, 76), (25, 38), (13, 19)]
    images = ImageList(torch.zeros(1, 3, 800, 1216), [(800, 1216)])
    ref = gen(images, [torch.zeros(1, 256, h, w) for h, w in sizes])[0]
    half = gen(images, [torch.zeros(1, 256, h, w, dtype=torch.bfloat16) for h, w in sizes])[0]
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, ref, rtol=0, atol=0)


def test_rpn_head_outputs_float32_under_autocast():
    model = hrnetdet.create_model("faster_rcnn_hrnetv2p_w18", **SMALL).eval()
    x = [torch.randn(1, 256, 24, 32)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, deltas = model.rpn.head(x)
    assert logits[0].dtype == deltas[0].dtype == torch.float32
    plain_logits, plain_deltas = model.rpn.head(x)
    assert plain_logits[0].dtype == torch.float32  # float32 layers: unchanged


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_box_postprocess_decodes_half_outputs_in_float32(dtype):
    model = hrnetdet.create_model("faster_rcnn_hrnetv2p_w18", **SMALL).eval()
    heads = model.roi_heads
    heads.score_thresh = 0.0
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(60, 2, generator=g) * 900
    proposals = [torch.cat([xy, xy + 40 + torch.rand(60, 2, generator=g) * 300], 1)]
    logits = (torch.randn(60, 81, generator=g) * 3).to(dtype)
    deltas = (torch.randn(60, 81 * 4, generator=g) * 0.2).to(dtype)
    out = heads.postprocess_detections(logits, deltas, proposals, [(1100, 1300)])
    ref = heads.postprocess_detections(logits.float(), deltas.float(), proposals, [(1100, 1300)])
    for a, b in zip(out, ref):  # boxes, scores, labels
        assert len(b[0]) > 0
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["mask_rcnn_hrnetv2p_w18", "cascade_mask_rcnn_hrnetv2p_w18", "fcos_hrnetv2p_w18"])
def test_autocast_inference_runs_and_returns_float32(arch):
    kwargs = dict(min_size=96, max_size=128)
    if not arch.startswith("fcos"):
        kwargs.update(rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50)
    model = hrnetdet.create_model(arch, **kwargs).eval()
    images = [torch.rand(3, 90, 120), torch.rand(3, 120, 100)]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images)
    for res, img in zip(out, images):
        assert res["boxes"].dtype == res["scores"].dtype == torch.float32
        if "masks" in res:
            assert res["masks"].dtype == torch.float32
            assert res["masks"].shape[-2:] == img.shape[-2:]
