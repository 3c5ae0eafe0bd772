"""Cascade R-CNN, Cascade Mask R-CNN and Hybrid Task Cascade on HRNetV2p.
See docs/NUMERICS.md, 'Cascade test-time scoring', 'HTC semantic branch' and 'HTC mask ensemble'."""
from typing import Any, List, Optional, Sequence

from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

from ..heads.cascade import CascadeRoIHeads, CascadeStage, ClassAgnosticPredictor, InfoFlowMaskHead
from ..heads.roi_align import ReferenceRoIAlign
from ..heads.roi_heads import box_head, mask_head
from ..heads.semantic import FusedSemanticHead
from .rcnn import ROI_FEATMAPS, HRNetDetector, build_detector
from .settings import CascadeSettings, HTCSettings, make_settings

STAGE_IOUS = (0.5, 0.6, 0.7)
# The reference's per-stage delta stds; torchvision's BoxCoder takes their inverses, unrounded.
STAGE_STDS = ((0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067))
STAGE_LOSS_WEIGHTS = (1.0, 0.5, 0.25)


def stage_box_coder_weights(stds: Sequence[float]) -> tuple:
    return tuple(1.0 / s for s in stds)


def _stages(num_classes: int, settings: CascadeSettings, *, with_mask: bool, info_flow: bool,
            low_quality: bool) -> List[CascadeStage]:
    stages = []
    for i, (iou, stds) in enumerate(zip(STAGE_IOUS, STAGE_STDS)):
        mask_kwargs = {}
        if with_mask:
            mask_kwargs = dict(mask_roi_pool=ReferenceRoIAlign(ROI_FEATMAPS, 14),
                               mask_head=InfoFlowMaskHead(with_conv_res=i > 0) if info_flow else mask_head(),
                               mask_predictor=MaskRCNNPredictor(256, 256, num_classes))
        stages.append(CascadeStage(
            ReferenceRoIAlign(ROI_FEATMAPS, 7), box_head(), ClassAgnosticPredictor(1024, num_classes),
            fg_iou_thresh=iou, bg_iou_thresh=iou, min_pos_iou=iou if low_quality else -1.0,
            batch_size_per_image=settings.box_batch_size_per_image, bbox_reg_weights=stage_box_coder_weights(stds),
            score_thresh=settings.score_thresh, nms_thresh=settings.nms_thresh,
            detections_per_img=settings.detections_per_img,
            box_loss="smooth_l1", box_loss_beta=1.0, **mask_kwargs,
        ))
    return stages


def build_cascade_rcnn(width: int, num_classes: int = 81, *, with_mask: bool = False,
                       categories: Optional[Sequence[str]] = None,
                       settings: Optional[CascadeSettings] = None, **changes: Any) -> HRNetDetector:
    """Cascade R-CNN (``with_mask=False``) or Cascade Mask R-CNN on HRNetV2p-W``width``: three
    class-agnostic box stages at IoU 0.5/0.6/0.7 (and three mask heads whose probabilities are
    averaged). ``settings``/``changes`` as ``build_rcnn``'s, in a ``CascadeSettings``."""
    settings = make_settings(CascadeSettings, settings, changes)
    stages = _stages(num_classes, settings, with_mask=with_mask, info_flow=False, low_quality=False)
    roi_heads = CascadeRoIHeads(stages, STAGE_LOSS_WEIGHTS, mask_ensemble=settings.mask_ensemble)
    return build_detector(width, roi_heads, settings, categories=categories, cascade=True)


def build_htc(width: int, num_classes: int = 81, *, with_mask: bool = True,
              categories: Optional[Sequence[str]] = None, settings: Optional[HTCSettings] = None,
              **changes: Any) -> HRNetDetector:
    """Hybrid Task Cascade on HRNetV2p-W``width``: interleaved box and mask stages with the mask
    information flow and, unless ``semantic=False``, the fused semantic branch (trained from the
    targets' ``semantic_seg`` maps when they have them). ``mask_ensemble="last"`` reproduces
    mmdetection 3.x's test-time masks; the default ``"mean"`` is the published models' (v2).
    ``settings``/``changes`` as ``build_rcnn``'s, in an ``HTCSettings``."""
    if not with_mask:
        raise ValueError("HTC's mask branch is part of its cascade: with_mask=False is Cascade R-CNN")
    settings = make_settings(HTCSettings, settings, changes)
    stages = _stages(num_classes, settings, with_mask=True, info_flow=True, low_quality=True)
    semantic_kwargs = {}
    if settings.semantic:
        semantic_kwargs = dict(semantic_head=FusedSemanticHead(num_classes=settings.semantic_num_classes),
                               semantic_roi_pool=ReferenceRoIAlign(["0"], 14, strides=(8,)))
    roi_heads = CascadeRoIHeads(stages, STAGE_LOSS_WEIGHTS, mask_info_flow=True, interleaved=True,
                                mask_ensemble=settings.mask_ensemble, **semantic_kwargs)
    return build_detector(width, roi_heads, settings, categories=categories, cascade=True)
