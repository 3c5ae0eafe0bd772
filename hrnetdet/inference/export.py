"""Export helpers: ONNX graphs of the detectors and of the backbone + neck (see docs/EXPORT.md).

ONNX export traces the model, so the graph is fixed to the batch size and image size it was
exported with (the resize, anchor grid and padding are computed for that size); the number of
detections stays dynamic. TorchScript needs no helper: ``torch.jit.script(model)``.
"""
from typing import List, Sequence, Tuple

import torch
from torch import Tensor, nn
from torchvision.models.detection.transform import resize_boxes

from ..detectors import has_masks
from .thresholds import score_threshold


class _FlatOutputs(nn.Module):
    """A detector taking one (B, 3, H, W) batch and returning a flat tuple of per-image tensors
    (boxes, labels, scores[, masks] for image 0, then image 1, ...), which ONNX can express.

    Mask models return the RoI heads' (N, 1, 28, 28) mask probabilities unpasted: pasting crops a
    window per box whose bounds tracing would freeze at the example's boxes."""

    def __init__(self, model: nn.Module, keys: Sequence[str]):
        super().__init__()
        self.model = model
        self.keys = list(keys)

    def forward(self, images: Tensor) -> Tuple[Tensor, ...]:
        imgs = list(images.unbind(0))
        if "masks" not in self.keys:
            results = self.model(imgs)
        else:  # GeneralizedRCNN.forward without the mask pasting of transform.postprocess
            m = self.model
            image_list, _ = m.transform(imgs)
            features = m.backbone(image_list.tensors)
            proposals, _ = m.rpn(image_list, features)
            results, _ = m.roi_heads(features, proposals, image_list.image_sizes)
            for r, size, img in zip(results, image_list.image_sizes, imgs):
                r["boxes"] = resize_boxes(r["boxes"], list(size), [img.shape[-2], img.shape[-1]])
        return tuple(r[k] for r in results for k in self.keys)


def output_keys(model: nn.Module) -> List[str]:
    return ["boxes", "labels", "scores"] + (["masks"] if has_masks(model) else [])


def export_onnx(model: nn.Module, path: str, batch_size: int = 1, image_size: Tuple[int, int] = (800, 1216),
                opset_version: int = 17) -> List[str]:
    """Export a detector to ONNX for ``batch_size`` images of ``image_size`` (H, W) each, with the
    TorchScript-based exporter. Input ``images`` (B, 3, H, W) floats in [0, 1]; outputs named
    ``boxes_0, labels_0, scores_0[, masks_0], boxes_1, ...``. Returns the output names.

    Mask models: ``masks_i`` are (N, 1, 28, 28) probabilities in each box's frame, to be pasted
    with ``hrnetdet.heads.masks.paste_masks(masks, boxes, H, W)``; they are exported with score
    threshold 0 (per-image splits are traced as constants, so every image must carry
    ``detections_per_img`` detections; filter by score afterwards)."""
    model.eval()
    keys = output_keys(model)
    names = [f"{k}_{i}" for i in range(batch_size) for k in keys]
    x = torch.rand(batch_size, 3, *image_size)
    # Tracing freezes the detection count in the per-image mask split: with threshold 0
    # every image carries detections_per_img detections.
    with score_threshold(model, 0.0 if "masks" in keys else None):
        torch.onnx.export(_FlatOutputs(model, keys), (x,), path, dynamo=False, opset_version=opset_version,
                          input_names=["images"], output_names=names,
                          dynamic_axes={n: {0: f"num_{n}"} for n in names})
    return names


class _PyramidTuple(nn.Module):
    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, images: Tensor) -> Tuple[Tensor, ...]:
        return tuple(self.backbone(images).values())


def export_backbone_onnx(model: nn.Module, path: str, batch_size: int = 1,
                         image_size: Tuple[int, int] = (800, 1216), opset_version: int = 17) -> List[str]:
    """Export a detector's backbone + neck (normalised, padded images -> pyramid levels ``p0..p4``)
    to ONNX, with dynamic height and width (multiples of 32)."""
    model.eval()
    x = torch.rand(batch_size, 3, *image_size)
    names = [f"p{i}" for i in range(len(model.backbone.fpn.fpn_convs))]
    torch.onnx.export(_PyramidTuple(model.backbone), (x,), path, dynamo=False, opset_version=opset_version,
                      input_names=["images"], output_names=names,
                      dynamic_axes={"images": {2: "height", 3: "width"},
                                    **{n: {2: f"{n}_height", 3: f"{n}_width"} for n in names}})
    return names
