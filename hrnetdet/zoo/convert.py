"""The reference's (mmdetection) checkpoint layouts and their conversion to hrnetdet's: pure
functions of state dicts, no file I/O. The rules: docs/NUMERICS.md, 'Checkpoint conversion'."""
import re
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..data.categories import categories_for
from .records import Family, Rule, Transform


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not fit the model it is loaded into."""


def background_first(t: Tensor) -> Tensor:
    """The reference's classifier has the background last; torchvision's has it first."""
    return torch.cat([t[-1:], t[:-1]])


def prepend_zero_rows(n: int) -> Transform:
    """Class-specific rows for the background, which the reference's heads do not have."""
    return lambda t: torch.cat([t.new_zeros((n,) + t.shape[1:]), t])


def flip_input_channels(t: Tensor) -> Tensor:
    """BGR-trained first conv to RGB input (docs/NUMERICS.md, 'FCOS BGR first conv')."""
    return t[:, [2, 1, 0]]


FIRST_CONV = "backbone.body.conv1.weight"

BACKBONE_RULES: List[Rule] = [
    (r"backbone\.(.+)", r"backbone.body.\1", None),
    (r"neck\.reduction_conv\.conv\.(weight|bias)", r"backbone.fpn.reduction_conv.\1", None),
    (r"neck\.fpn_convs\.(\d+)\.conv\.(weight|bias)", r"backbone.fpn.fpn_convs.\1.\2", None),
]

RPN_RULES: List[Rule] = [
    (r"rpn_head\.rpn_conv\.(weight|bias)", r"rpn.head.conv.0.0.\1", None),
    (r"rpn_head\.rpn_cls\.(weight|bias)", r"rpn.head.cls_logits.\1", None),
    (r"rpn_head\.rpn_reg\.(weight|bias)", r"rpn.head.bbox_pred.\1", None),
]

BOX_HEAD_RULES: List[Rule] = [
    (r"roi_head\.bbox_head\.shared_fcs\.0\.(weight|bias)", r"roi_heads.box_head.fc6.\1", None),
    (r"roi_head\.bbox_head\.shared_fcs\.1\.(weight|bias)", r"roi_heads.box_head.fc7.\1", None),
    (r"roi_head\.bbox_head\.fc_cls\.(weight|bias)", r"roi_heads.box_predictor.cls_score.\1", background_first),
    (r"roi_head\.bbox_head\.fc_reg\.(weight|bias)", r"roi_heads.box_predictor.bbox_pred.\1", prepend_zero_rows(4)),
]

MASK_HEAD_RULES: List[Rule] = [
    (r"roi_head\.mask_head\.convs\.(\d)\.conv\.(weight|bias)", r"roi_heads.mask_head.\1.0.\2", None),
    (r"roi_head\.mask_head\.upsample\.(weight|bias)", r"roi_heads.mask_predictor.conv5_mask.\1", None),
    (r"roi_head\.mask_head\.conv_logits\.(weight|bias)", r"roi_heads.mask_predictor.mask_fcn_logits.\1",
     prepend_zero_rows(1)),
]

# The FCOS head keeps the reference's layout under ``head.`` (torchvision's FCOSHead cannot take it).
# See docs/NUMERICS.md, 'FCOS BGR first conv' and 'FCOS head'.
FCOS_RULES: List[Rule] = [
    *BACKBONE_RULES,
    (r"bbox_head\.(.+)", r"head.\1", None),
]

# Cascades: per-stage heads ``roi_head.{bbox,mask}_head.{s}.`` -> ``roi_heads.stages.{s}.``;
# the class-agnostic fc_reg needs no background rows. HTC's mask trunks sit under ``.convs``.
CASCADE_BOX_RULES: List[Rule] = [
    (r"roi_head\.bbox_head\.(\d)\.shared_fcs\.0\.(weight|bias)", r"roi_heads.stages.\1.box_head.fc6.\2", None),
    (r"roi_head\.bbox_head\.(\d)\.shared_fcs\.1\.(weight|bias)", r"roi_heads.stages.\1.box_head.fc7.\2", None),
    (r"roi_head\.bbox_head\.(\d)\.fc_cls\.(weight|bias)", r"roi_heads.stages.\1.box_predictor.cls_score.\2",
     background_first),
    (r"roi_head\.bbox_head\.(\d)\.fc_reg\.(weight|bias)", r"roi_heads.stages.\1.box_predictor.bbox_pred.\2", None),
]


def cascade_mask_rules(trunk: str) -> List[Rule]:
    return [
        (r"roi_head\.mask_head\.(\d)\.convs\.(\d)\.conv\.(weight|bias)",
         rf"roi_heads.stages.\1.mask_head.{trunk}\2.0.\3", None),
        (r"roi_head\.mask_head\.(\d)\.upsample\.(weight|bias)", r"roi_heads.stages.\1.mask_predictor.conv5_mask.\2",
         None),
        (r"roi_head\.mask_head\.(\d)\.conv_logits\.(weight|bias)",
         r"roi_heads.stages.\1.mask_predictor.mask_fcn_logits.\2", prepend_zero_rows(1)),
    ]


HTC_RULES: List[Rule] = cascade_mask_rules("convs.") + [
    (r"roi_head\.mask_head\.(\d)\.conv_res\.conv\.(weight|bias)", r"roi_heads.stages.\1.mask_head.conv_res.0.\2",
     None),
    (r"roi_head\.semantic_head\.(lateral_convs\.\d|convs\.\d|conv_embedding)\.conv\.(weight|bias)",
     r"roi_heads.semantic_head.\1.0.\2", None),
    (r"roi_head\.semantic_head\.conv_logits\.(weight|bias)", r"roi_heads.semantic_head.conv_logits.\1", None),
]


def identify_reference(state_dict: Dict[str, Tensor], path: str, families: Iterable[Family]) -> Tuple[Family, int]:
    """The family (among ``families``) and width of a reference checkpoint, from its keys."""
    if "backbone.transition1.0.0.weight" not in state_dict:
        raise CheckpointError(f"{path}: no 'backbone.transition1.0.0.weight' key: not an HRNetV2p "
                              f"detector checkpoint (first keys: {list(state_dict)[:5]})")
    width = int(state_dict["backbone.transition1.0.0.weight"].shape[0])
    for family in families:
        layout = family.reference
        if layout.signature in state_dict and not any(k in state_dict for k in layout.excluded):
            return family, width
    raise CheckpointError(f"{path}: HRNetV2p-W{width} checkpoint of no known detector family "
                          f"(head keys: {sorted({k.split('.')[0] for k in state_dict})})")


def convert_reference(state_dict: Dict[str, Tensor], family: Family, path: str = "<state_dict>"
                      ) -> Dict[str, Tensor]:
    """Rename and transform every reference key; a key no rule knows is an error. A BGR-trained
    checkpoint's first convolution is flipped to RGB input."""
    layout = family.reference
    rules = [(re.compile(p + r"$"), r, f) for p, r, f in layout.rules]
    out: Dict[str, Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        for pattern, repl, fn in rules:
            if pattern.match(key):
                out[pattern.sub(repl, key)] = fn(value) if fn is not None else value
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{path}: {len(unknown)} keys of no {family.name} layout: {unknown[:8]}")
    if layout.bgr_input:
        out[FIRST_CONV] = flip_input_channels(out[FIRST_CONV])
    return out


def reference_categories(meta: dict, num_classes: int) -> List[str]:
    """The category names a reference checkpoint's ``meta`` records (mmdet 2.x: CLASSES, 3.x:
    dataset_meta.classes), when they are plain names that fit."""
    dataset_meta = meta.get("dataset_meta")
    classes = meta.get("CLASSES") or (dataset_meta.get("classes") if isinstance(dataset_meta, dict) else None)
    fits = isinstance(classes, (list, tuple)) and len(classes) == num_classes - 1 and all(isinstance(c, str) for c in classes)
    return categories_for(num_classes, classes if fits else None)
