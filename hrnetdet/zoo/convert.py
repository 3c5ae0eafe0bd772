"""Reading checkpoints: the reference's (mmdetection) ``.pth`` files, converted to hrnetdet's
layout, and hrnetdet's own ``.safetensors`` files with their metadata. The conversion rules:
docs/NUMERICS.md, 'Checkpoint conversion'."""
import json
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .coco import BACKGROUND, COCO_CATEGORIES, COCO_CATEGORY_NAMES


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not fit the model it is loaded into."""


Transform = Callable[[Tensor], Tensor]


def background_first(t: Tensor) -> Tensor:
    """The reference's classifier has the background last; torchvision's has it first."""
    return torch.cat([t[-1:], t[:-1]])


def prepend_zero_rows(n: int) -> Transform:
    """Class-specific rows for the background, which the reference's heads do not have."""
    return lambda t: torch.cat([t.new_zeros((n,) + t.shape[1:]), t])


def flip_input_channels(t: Tensor) -> Tensor:
    """BGR-trained first conv to RGB input (the reference's FCOS checkpoints)."""
    return t[:, [2, 1, 0]]


Rule = Tuple[str, str, Optional[Transform]]

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

# The reference's FCOS was trained on BGR input; hrnetdet's takes RGB. The head keeps
# the reference's layout under ``head.`` (torchvision's FCOSHead cannot take it).
# See docs/NUMERICS.md, 'FCOS BGR first conv' and 'FCOS head'.
FCOS_RULES: List[Rule] = [
    (r"backbone\.conv1\.weight", r"backbone.body.conv1.weight", flip_input_channels),
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

# family -> (rules, a key only that family's reference checkpoints have, keys they must not have)
REFERENCE_LAYOUTS: Dict[str, Tuple[List[Rule], str, Tuple[str, ...]]] = {
    "faster_rcnn": (BACKBONE_RULES + RPN_RULES + BOX_HEAD_RULES,
                    "roi_head.bbox_head.fc_cls.weight", ("roi_head.mask_head.conv_logits.weight",)),
    "mask_rcnn": (BACKBONE_RULES + RPN_RULES + BOX_HEAD_RULES + MASK_HEAD_RULES,
                  "roi_head.mask_head.conv_logits.weight", ()),
    "cascade_rcnn": (BACKBONE_RULES + RPN_RULES + CASCADE_BOX_RULES,
                     "roi_head.bbox_head.0.fc_cls.weight", ("roi_head.mask_head.0.conv_logits.weight",)),
    "cascade_mask_rcnn": (BACKBONE_RULES + RPN_RULES + CASCADE_BOX_RULES + cascade_mask_rules(""),
                          "roi_head.mask_head.0.conv_logits.weight", ("roi_head.mask_head.1.conv_res.conv.weight",)),
    "htc": (BACKBONE_RULES + RPN_RULES + CASCADE_BOX_RULES + HTC_RULES,
            "roi_head.mask_head.1.conv_res.conv.weight", ()),
    "fcos": (FCOS_RULES, "bbox_head.conv_centerness.weight", ()),
}


@dataclass
class Checkpoint:
    """A state dict in hrnetdet's layout plus what is known about it."""
    state_dict: Dict[str, Tensor]
    source: str                          # "reference" or "hrnetdet"
    family: Optional[str] = None
    width: Optional[int] = None
    num_classes: Optional[int] = None
    categories: Optional[List[str]] = None
    meta: Dict[str, object] = field(default_factory=dict)


def identify_reference(state_dict: Dict[str, Tensor], path: str) -> Tuple[str, int]:
    """The family and width of a reference checkpoint, from its keys."""
    if "backbone.transition1.0.0.weight" not in state_dict:
        raise CheckpointError(f"{path}: no 'backbone.transition1.0.0.weight' key: not an HRNetV2p "
                              f"detector checkpoint (first keys: {list(state_dict)[:5]})")
    width = int(state_dict["backbone.transition1.0.0.weight"].shape[0])
    for family, (_, signature, excluded) in REFERENCE_LAYOUTS.items():
        if signature in state_dict and not any(k in state_dict for k in excluded):
            return family, width
    raise CheckpointError(f"{path}: HRNetV2p-W{width} checkpoint of no known detector family "
                          f"(head keys: {sorted({k.split('.')[0] for k in state_dict})})")


def convert_reference(state_dict: Dict[str, Tensor], family: str, path: str = "<state_dict>"
                      ) -> Dict[str, Tensor]:
    """Rename and transform every reference key; a key no rule knows is an error."""
    rules = [(re.compile(p + r"$"), r, f) for p, r, f in REFERENCE_LAYOUTS[family][0]]
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
        raise CheckpointError(f"{path}: {len(unknown)} keys of no {family} layout: {unknown[:8]}")
    return out


def _reference_categories(meta: dict, num_fg: int) -> List[str]:
    classes = meta.get("CLASSES") or (meta.get("dataset_meta") or {}).get("classes")
    if classes and len(classes) == num_fg:
        return [BACKGROUND] + list(classes)
    if num_fg == len(COCO_CATEGORY_NAMES):
        return list(COCO_CATEGORIES)
    return [BACKGROUND] + [f"class_{i}" for i in range(1, num_fg + 1)]


def _torch_load(path: str) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, random bytes...
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated, corrupted or "
                              f"not a checkpoint at all): {type(e).__name__}: {e}") from e


def read_checkpoint(path: str) -> Checkpoint:
    """Read a reference ``.pth`` (converted on the fly) or an hrnetdet ``.safetensors`` file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.endswith(".safetensors"):
        return _read_safetensors(path)
    obj = _torch_load(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):
        sd, meta = obj["state_dict"], obj.get("meta") or {}
        if any(k.startswith("module.") for k in sd):
            sd = {k[len("module."):]: v for k, v in sd.items()}
        family, width = identify_reference(sd, path)
        num_classes = int(REFERENCE_NUM_CLASSES[family](sd))
        return Checkpoint(convert_reference(sd, family, path), "reference", family, width,
                          num_classes, _reference_categories(meta, num_classes - 1), dict(meta))
    if all(isinstance(v, Tensor) for v in obj.values()):
        return Checkpoint(dict(obj), "hrnetdet")
    raise CheckpointError(f"{path}: a dict without 'state_dict' whose values are not all tensors: "
                          f"not a checkpoint hrnetdet knows")


def _foreground_rows(key: str) -> Callable[[Dict[str, Tensor]], int]:
    return lambda sd: sd[key].shape[0]


# Number of classes (with background) that a reference checkpoint was trained for.
REFERENCE_NUM_CLASSES: Dict[str, Callable[[Dict[str, Tensor]], int]] = {
    "faster_rcnn": _foreground_rows("roi_head.bbox_head.fc_cls.weight"),
    "mask_rcnn": _foreground_rows("roi_head.bbox_head.fc_cls.weight"),
    "cascade_rcnn": _foreground_rows("roi_head.bbox_head.0.fc_cls.weight"),
    "cascade_mask_rcnn": _foreground_rows("roi_head.bbox_head.0.fc_cls.weight"),
    "htc": _foreground_rows("roi_head.bbox_head.0.fc_cls.weight"),
    "fcos": lambda sd: sd["bbox_head.conv_cls.weight"].shape[0] + 1,
}


def _read_safetensors(path: str) -> Checkpoint:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        sd = load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupted): {e}") from e
    info = json.loads(meta.get("hrnetdet", "{}"))
    return Checkpoint(sd, "hrnetdet", info.get("family"), info.get("width"), info.get("num_classes"),
                      info.get("categories"), info)


def save_safetensors(model: nn.Module, path: str, arch: str, extra: Optional[dict] = None) -> dict:
    """Write the model's weights atomically, with a config.json beside them; returns the config."""
    from safetensors.torch import save_file
    from .registry import get_family
    family, width = get_family(arch)
    config = {
        "architecture": arch, "family": family.name, "width": width,
        "num_classes": len(model.categories),
        "categories": list(model.categories),
        **(extra or {}),
    }
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    _atomic(path, lambda tmp: save_file(sd, tmp, metadata={"hrnetdet": json.dumps(config)}))
    cfg_path = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
    _atomic(cfg_path, lambda tmp: open(tmp, "w").write(json.dumps(config, indent=2)))
    return config


def _atomic(path: str, write: Callable[[str], object]) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_into(model: nn.Module, state_dict: Dict[str, Tensor], path: str, arch: str) -> None:
    """Strict load that names every missing, unexpected and mis-shaped key."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in own.items() if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append(f"{len(mismatched)} mismatched shapes, e.g. {mismatched[:4]}")
        if missing:
            parts.append(f"{len(missing)} missing keys, e.g. {missing[:4]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:4]}")
        raise CheckpointError(f"{path} does not fit {arch}: " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=True)
