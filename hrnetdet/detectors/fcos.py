"""FCOS (GN head) on HRNetV2p with HRFPN stride 2 (levels at strides 8..128), in torchvision's
detection contract: train mode returns the losses ``loss_classification``, ``loss_bbox_regression``
and ``loss_bbox_ctrness`` (``loss_`` prefixed, as every family's); eval mode returns {boxes,
labels (1..K), scores} in original-image coordinates.

The reference's FCOS checkpoints were trained on BGR input; conversion flips
the first conv's input channels once, so the model takes RGB in [0, 1] with ImageNet mean/std like
every other hrnetdet model (docs/NUMERICS.md, 'FCOS BGR first conv')."""
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..heads.fcos import FCOSHead, fcos_points
from .rcnn import build_transform, hrnetv2p_backbone
from .settings import FCOSSettings, make_settings
from .targets import check_targets
from .transform import ReferenceTransform


class FCOSDetector(nn.Module):
    """Backbone -> FCOS head, with the reference's resize/pad transform and category names
    (index 0 is the background)."""

    def __init__(self, backbone: nn.Module, head: FCOSHead, transform: ReferenceTransform,
                 categories: Optional[Sequence[str]] = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.transform = transform
        self.categories: List[str] = list(categories) if categories is not None else []

    @torch.jit.unused  # training only
    def check_targets(self, images: List[Tensor], targets: Optional[List[Dict[str, Tensor]]]) -> None:
        check_targets(images, targets, self.head.num_classes + 1)

    def forward(self, images: List[Tensor], targets: Optional[List[Dict[str, Tensor]]] = None
                ) -> Tuple[Dict[str, Tensor], List[Dict[str, Tensor]]]:
        """Losses in training, detections in eval; TorchScript returns ``(losses, detections)`` in
        both, as torchvision's scripted detectors do."""
        losses: Dict[str, Tensor] = {}
        detections: List[Dict[str, Tensor]] = []
        if len(images) > 0 or self.training:
            losses, detections = self.losses_and_detections(images, targets)
        if torch.jit.is_scripting():
            return losses, detections
        return self.eager_outputs(losses, detections)

    @torch.jit.unused
    def eager_outputs(self, losses: Dict[str, Tensor], detections: List[Dict[str, Tensor]]
                      ) -> Union[Dict[str, Tensor], List[Dict[str, Tensor]]]:
        return losses if self.training else detections

    def losses_and_detections(self, images: List[Tensor], targets: Optional[List[Dict[str, Tensor]]]
                              ) -> Tuple[Dict[str, Tensor], List[Dict[str, Tensor]]]:
        """(losses, no detections) in training, (no losses, detections) in eval."""
        if self.training and not torch.jit.is_scripting():
            self.check_targets(images, targets)
        original_sizes: List[Tuple[int, int]] = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        image_list, targets = self.transform(images, targets)
        features = list(self.backbone(image_list.tensors).values())
        cls_logits, distances, ctr_logits = self.head(features)
        points = fcos_points([(int(f.shape[-2]), int(f.shape[-1])) for f in features], self.head.strides,
                             distances[0].dtype, distances[0].device)
        no_detections: List[Dict[str, Tensor]] = []
        if self.training:
            assert targets is not None
            return self.head.compute_loss(targets, cls_logits, distances, ctr_logits, points), no_detections
        detections = self.head.postprocess_detections(cls_logits, distances, ctr_logits, points,
                                                      image_list.image_sizes)
        no_losses: Dict[str, Tensor] = {}
        return no_losses, self.transform.postprocess(detections, image_list.image_sizes, original_sizes)


def build_fcos(width: int, num_classes: int = 81, *, categories: Optional[Sequence[str]] = None,
               settings: Optional[FCOSSettings] = None, **changes: Any) -> FCOSDetector:
    """FCOS on HRNetV2p-W``width``. ``num_classes`` counts the background (COCO: 81); the head has
    ``num_classes - 1`` sigmoid outputs. ``postprocess`` selects the reference's v2.7 test rule
    (the published numbers, default) or mmdet 3.3's (``"v3"``, for parity against it): settings
    of the ``FCOSSettings`` record (``settings``, or its defaults, with the keyword ``changes`` over it)."""
    settings = make_settings(FCOSSettings, settings, changes)
    backbone = hrnetv2p_backbone(width, fpn_stride=2, norm_eval=settings.norm_eval,
                                 frozen_stages=settings.frozen_stages)
    head = FCOSHead(backbone.out_channels, num_classes - 1, strides=backbone.strides,
                    score_thresh=settings.score_thresh, nms_thresh=settings.nms_thresh,
                    topk_candidates=settings.topk_candidates, detections_per_img=settings.detections_per_img,
                    postprocess=settings.postprocess)
    model = FCOSDetector(backbone, head, build_transform(settings, None), categories)
    model.settings = settings
    return model
