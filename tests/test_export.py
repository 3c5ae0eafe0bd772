"""Exported models compute what the eager model computes: TorchScript for every family, ONNX
(onnxruntime) for Faster R-CNN, Mask R-CNN and FCOS, torch.export for the backbone + neck."""
import numpy as np
import pytest
import torch

import hrnetdet
from hrnetdet.heads.masks import paste_masks
from calibrate import calibrate
from hrnetdet.inference import match_detections
from hrnetdet.inference.match import MIN_MATCHED
from hrnetdet.inference.export import export_backbone_onnx, export_onnx


@pytest.fixture(scope="module")
def image():
    skimage_data = pytest.importorskip("skimage.data")
    return torch.from_numpy(skimage_data.rocket()[::3, ::3].copy()).permute(2, 0, 1).float() / 255


def small_model(family: str, image: torch.Tensor):
    torch.manual_seed(0)
    kwargs = dict(min_size=128, max_size=192)
    if family != "fcos":
        kwargs.update(rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=100)
    return calibrate(hrnetdet.create_model(f"{family}_hrnetv2p_w18", **kwargs), [image])


def assert_same_detections(ref, out):
    assert len(ref["scores"]) > 0
    stats = match_detections(ref, out)
    assert stats["matched_frac"] >= MIN_MATCHED, stats
    if "masks" in ref:
        assert out["masks"].shape == ref["masks"].shape
        agree = (out["masks"] >= 0.5) == (ref["masks"] >= 0.5)
        assert agree.float().mean() >= 0.999


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
@pytest.mark.parametrize("family", [f.name for f in hrnetdet.list_families()])
def test_torchscript_matches_eager(family, image):
    model = small_model(family, image)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        ref = model([image])[0]
        out = scripted([image])
    out = out[1] if isinstance(out, tuple) else out  # GeneralizedRCNN returns (losses, detections)
    assert_same_detections(ref, out[0])


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
@pytest.mark.parametrize("family", ["faster_rcnn", "mask_rcnn", "fcos"])
def test_onnx_matches_eager(family, image, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = small_model(family, image)
    with torch.no_grad():
        ref = model([image])[0]
    path = str(tmp_path / "model.onnx")
    names = export_onnx(model, path, batch_size=1, image_size=tuple(image.shape[-2:]))
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    outs = session.run(None, {"images": image[None].numpy()})
    got = {n.rsplit("_", 1)[0]: torch.from_numpy(o) for n, o in zip(names, outs)}
    if "masks" in got:  # exported unpasted, in each box's frame
        assert got["masks"].shape[-2:] == (28, 28)
        got["masks"] = paste_masks(got["masks"], got["boxes"], *image.shape[-2:], model.transform.mask_thresh)
    assert_same_detections(ref, got)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
def test_backbone_onnx_dynamic_size_and_torch_export(image, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = small_model("faster_rcnn", image)
    path = str(tmp_path / "backbone.onnx")
    names = export_backbone_onnx(model, path, image_size=(128, 192))
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    x = torch.rand(1, 3, 160, 224)  # another size than the exported one
    with torch.no_grad():
        ref = list(model.backbone(x).values())
    outs = session.run(None, {"images": x.numpy()})
    assert len(outs) == len(names) == 5
    for o, r in zip(outs, ref):
        np.testing.assert_allclose(o, r.numpy(), rtol=1e-3, atol=1e-3 * float(r.abs().max()))
    exported = torch.export.export(model.backbone, (x,))
    with torch.no_grad():
        out = exported.module()(x)
    for k, r in zip(out, ref):
        torch.testing.assert_close(out[k], r, rtol=1e-5, atol=1e-5 * float(r.abs().max()))
