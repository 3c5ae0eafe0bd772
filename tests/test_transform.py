"""The reference's input resize: cv2 INTER_LINEAR on 8-bit pixels, then normalisation.
The oracle is OpenCV's own output, stored by tools run in the reference environment."""
from pathlib import Path

import pytest
import torch

from hrnetdet.detectors.rcnn import IMAGENET_MEAN, IMAGENET_STD, build_transform
from hrnetdet.detectors.transform import cv2_linear_resize

CV2 = torch.load(Path(__file__).parent / "data" / "cv2_inter_linear_uint8.pt", weights_only=True)


@pytest.mark.parametrize("case", ["up", "down", "mixed"])
def test_resize_is_bit_exact_with_cv2(case):
    src, expected = CV2[case]["input"], CV2[case]["cv2"]
    got = cv2_linear_resize(src.float() / 255, expected.shape[-2], expected.shape[-1])
    assert torch.equal((got * 255).round().to(torch.uint8), expected)


def test_transform_normalises_after_resizing():
    src, expected = CV2["up"]["input"], CV2["up"]["cv2"]         # 9x13 -> 24x35 is the reference size
    transform = build_transform(24, 35).eval()
    images, _ = transform([src.float() / 255])
    assert images.image_sizes == [(24, 35)]
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    torch.testing.assert_close(images.tensors[0, :, :24, :35], (expected.float() / 255 - mean) / std)
    with pytest.raises(TypeError, match="float image"):
        transform([src])
