"""A built detector's builder arguments, read back from its modules: what a saved model needs to
be rebuilt with the same settings (input sizes, thresholds, proposal counts...), including those
changed after it was built (e.g. a training run's multi-scale sizes)."""
from typing import Any, Callable, Dict, List

from torch import nn

Reader = Callable[[nn.Module], Any]


def box_roi_heads(model: nn.Module) -> nn.Module:
    """The RoI heads that carry the box settings: the heads, or a cascade's first stage (every
    stage is built with the same)."""
    heads = model.roi_heads
    return heads.stages[0] if hasattr(heads, "stages") else heads


def _floats(values) -> List[float]:
    return [float(v) for v in values]


# builder keyword -> how to read it from a model. A model without the part (FCOS has no RPN) does
# not have the keyword; one whose family's builder does not take it reads as its default.
READERS: Dict[str, Reader] = {
    "norm_eval": lambda m: bool(m.backbone.body.norm_eval),
    "frozen_stages": lambda m: int(m.backbone.body.frozen_stages),
    "min_size": lambda m: [int(s) for s in m.transform.min_size],
    "max_size": lambda m: int(m.transform.max_size),
    "image_mean": lambda m: _floats(m.transform.image_mean),
    "image_std": lambda m: _floats(m.transform.image_std),
    "mask_thresh": lambda m: m.transform.mask_thresh,
    "rpn_pre_nms_top_n_train": lambda m: int(m.rpn._pre_nms_top_n["training"]),
    "rpn_pre_nms_top_n_test": lambda m: int(m.rpn._pre_nms_top_n["testing"]),
    "rpn_post_nms_top_n_train": lambda m: int(m.rpn._post_nms_top_n["training"]),
    "rpn_post_nms_top_n_test": lambda m: int(m.rpn._post_nms_top_n["testing"]),
    "rpn_nms_thresh": lambda m: float(m.rpn.nms_thresh),
    "rpn_batch_size_per_image": lambda m: int(m.rpn.fg_bg_sampler.batch_size_per_image),
    "box_score_thresh": lambda m: float(box_roi_heads(m).score_thresh),
    "box_nms_thresh": lambda m: float(box_roi_heads(m).nms_thresh),
    "box_detections_per_img": lambda m: int(box_roi_heads(m).detections_per_img),
    "box_batch_size_per_image": lambda m: int(box_roi_heads(m).fg_bg_sampler.batch_size_per_image),
    "mask_ensemble": lambda m: str(m.roi_heads.mask_ensemble),
    "semantic": lambda m: m.roi_heads.semantic_head is not None,
    "semantic_num_classes": lambda m: int(m.roi_heads.semantic_head.conv_logits.out_channels),
    "score_thresh": lambda m: float(m.head.score_thresh),
    "nms_thresh": lambda m: float(m.head.nms_thresh),
    "topk_candidates": lambda m: int(m.head.topk_candidates),
    "detections_per_img": lambda m: int(m.head.detections_per_img),
    "postprocess": lambda m: str(m.head.postprocess),
}


def build_args(model: nn.Module) -> Dict[str, Any]:
    """Every builder keyword the model's modules answer, as JSON values."""
    args = {}
    for key, read in READERS.items():
        try:
            args[key] = read(model)
        except AttributeError:
            continue
    return args
