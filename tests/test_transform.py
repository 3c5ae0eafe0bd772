"""The reference's input resize: cv2 INTER_LINEAR on 8-bit pixels, then normalisation.
The oracle is OpenCV's own output, stored by tools run in the reference environment."""
from pathlib import Path

import pytest
import torch

import hrnetdet
from calibrate import calibrate
from hrnetdet.detectors.rcnn import IMAGENET_MEAN, IMAGENET_STD, build_transform
from hrnetdet.detectors.settings import RCNNSettings
from hrnetdet.detectors.transform import cv2_linear_resize

CV2 = torch.load(Path(__file__).parent / "data" / "cv2_inter_linear_uint8.pt", weights_only=True)


@pytest.mark.parametrize("case", ["up", "down", "mixed"])
def test_resize_is_bit_exact_with_cv2(case):
    src, expected = CV2[case]["input"], CV2[case]["cv2"]
    got = cv2_linear_resize(src.float() / 255, expected.shape[-2], expected.shape[-1])
    assert torch.equal((got * 255).round().to(torch.uint8), expected)


def test_transform_normalises_after_resizing():
    src, expected = CV2["up"]["input"], CV2["up"]["cv2"]         # 9x13 -> 24x35 is the reference size
    transform = build_transform(RCNNSettings(min_size=24, max_size=35), 0.5).eval()
    images, _ = transform([src.float() / 255])
    assert images.image_sizes == [(24, 35)]
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    torch.testing.assert_close(images.tensors[0, :, :24, :35], (expected.float() / 255 - mean) / std)
    with pytest.raises(ValueError, match="image 0: dtype torch.uint8"):
        transform([src])


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    image = torch.rand(3, 6, 9).repeat_interleave(8, 1).repeat_interleave(8, 2)  # blocky 48 x 72
    model = hrnetdet.create_model("faster_rcnn_hrnetv2p_w18", min_size=96, max_size=128,
                                  rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=100)
    return calibrate(model, [image]), (image * 255).round() / 255  # on the 8-bit grid


@pytest.mark.parametrize("bad, problem", [
    (torch.rand(3, 40, 50) * 255, r"image 1: values up to 2\d\d\.\d*; expected floats in \[0, 1\]: divide uint8 images by 255"),
    (torch.full((3, 40, 50), float("nan")), "image 1: contains NaN"),
    (torch.full((3, 40, 50), float("-inf")), "image 1: values down to -inf"),
    ((torch.rand(3, 40, 50) * 255).to(torch.uint8), "image 1: dtype torch.uint8; expected floats in .0, 1.: divide uint8"),
    (torch.rand(4, 40, 50), r"image 1: shape \[4, 40, 50\]; expected \(3, H, W\) RGB"),
    (torch.rand(40, 50), r"image 1: shape \[40, 50\]"),
    (torch.rand(3, 1, 300), "image 1: 1x300 pixels; expected at least 8 on each side"),
    (torch.rand(3, 0, 0), "image 1: 0x0 pixels"),
])
def test_out_of_contract_images_are_refused_naming_the_image(detector, bad, problem):
    model, image = detector
    with pytest.raises(ValueError, match=problem):
        model([image, bad])


def test_other_float_dtypes_are_cast_and_empty_lists_pass(detector):
    model, image = detector
    with torch.no_grad():
        ref = model([image])[0]
        assert len(ref["scores"]) > 0
        for dtype in (torch.float64, torch.float16):  # both hold the 8-bit grid exactly
            out = model([image.to(dtype)])[0]
            for k in ("boxes", "scores", "labels"):
                assert torch.equal(out[k], ref[k]), (dtype, k)
        assert model([image.bfloat16()])[0]["boxes"].dtype == torch.float32
        assert model([]) == []


def test_thin_images_are_padded_for_the_pyramid(detector):
    model, _ = detector
    with torch.no_grad():  # resized to 2 x 128 (16 x 1000) and 8 x 128: the batch is padded to 64 rows
        for shape in ((3, 16, 1000), (3, 8, 130)):
            out = model([torch.rand(*shape)])[0]
            assert out["boxes"].shape[1] == 4
            if len(out["boxes"]):
                assert out["boxes"][:, 3].max() <= shape[1]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_torchscript_shares_the_checks(detector):
    model, image = detector
    scripted = torch.jit.script(model)
    with torch.no_grad():
        assert scripted([])[1] == []
        ref = model([image])[0]
        torch.testing.assert_close(scripted([image.double()])[1][0]["boxes"], ref["boxes"])
        with pytest.raises(Exception, match="image 0: values up to"):
            scripted([image * 255])
