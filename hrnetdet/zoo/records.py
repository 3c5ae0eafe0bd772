"""The records the zoo is made of, and nothing else: a detector family (how to build it, how the
reference's checkpoints of it are laid out, whether it predicts masks) and a published weight set.
Every other zoo module reads these; this one imports no other zoo module but the COCO table."""
import importlib
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

from ..data.categories import COCO_CATEGORIES
from ..detectors.settings import IMAGENET_MEAN, IMAGENET_STD, DetectorSettings
from .recipe import RCNN_RECIPE, Recipe

Transform = Callable[[Any], Any]  # a tensor's conversion
Rule = Tuple[str, str, Optional[Transform]]  # (reference key regex, hrnetdet key template, value transform)


@dataclass(frozen=True)
class ReferenceLayout:
    """How the reference (mmdetection) lays out a family's checkpoints."""
    rule_source: Callable[[], Tuple[Rule, ...]]  # makes the rules (every key maps by exactly one)
    signature: str                 # a key only this family's checkpoints have...
    excluded: Tuple[str, ...]      # ...together with none of these
    classifier: str                # the classification layer: its rows count the classes
    background_row: bool = True    # the classifier has a background row (softmax), else sigmoid
    bgr_input: bool = False        # trained on BGR input: conversion flips the first conv's channels

    @property
    def rules(self) -> Tuple[Rule, ...]:
        """The rules, made when a checkpoint is converted: they import torch, the zoo's tables do not."""
        return self.rule_source()

    def num_classes(self, state_dict: Dict[str, Any]) -> int:
        """Classes including the background, as torchvision counts them."""
        rows = int(state_dict[self.classifier].shape[0])
        return rows if self.background_row else rows + 1

    @property
    def input_format(self) -> str:
        return "BGR" if self.bgr_input else "RGB"


@dataclass(frozen=True)
class Family:
    """A detector family: how to build it (its builder is named "module:function" and imported on
    the first build, so that the zoo's tables load without torch), its settings record, whether it
    predicts masks, and the reference's layout."""
    name: str                      # "faster_rcnn"
    title: str                     # "Faster R-CNN"
    builder_name: str              # "hrnetdet.detectors.rcnn:build_rcnn"
    settings: type                 # its DetectorSettings record (RCNNSettings...)
    reference: ReferenceLayout
    has_masks: bool = False        # the one mask flag: the builder gets with_mask=True from it
    widths: Tuple[int, ...] = (18, 32, 40, 48)
    recipe: Recipe = RCNN_RECIPE   # how the reference trains it (the training engine reads it)

    @property
    def builder(self) -> Callable[..., Any]:
        module, function = self.builder_name.split(":")
        return getattr(importlib.import_module(module), function)

    def make_settings(self, values: Optional[Dict[str, Any]] = None) -> DetectorSettings:
        """The family's record: its defaults with ``values`` (keywords or a config.json's build_args) over them."""
        return self.settings.from_dict(values or {})

    def build(self, width: int, **kwargs) -> Any:
        if self.has_masks:
            kwargs = {"with_mask": True, **kwargs}
        return self.builder(width, **kwargs)


def arch_name(family: str, width: int) -> str:
    return f"{family}_hrnetv2p_w{width}"


REFERENCE_URL_ROOT = "https://download.openmmlab.com/mmdetection/v2.0/hrnet"


@dataclass(frozen=True)
class PretrainedCfg:
    """One published weight set of an architecture (timm's PretrainedCfg, detection flavoured)."""
    arch: str
    tag: str
    reference_file: str            # the reference checkpoint's file name (carries its sha256 prefix)
    metrics: Dict[str, float]      # the reference's published figures (box_ap, mask_ap, ...)
    schedule: str
    multiscale_train: bool = False
    hf_hub_id: Optional[str] = None
    hf_filename: str = "model.safetensors"
    hf_revision: Optional[str] = None  # a full 40-hex commit: downloads are pinned to it
    sha256: Optional[str] = None   # of our converted safetensors file, once published
    parity: Optional[Dict[str, float]] = None  # our measured figures (parity harness), same keys as metrics
    license: str = "Apache-2.0"
    dataset: str = "COCO"
    categories: Tuple[str, ...] = COCO_CATEGORIES
    # What our weights expect: RGB in [0, 1], normalised as (x - mean) / std inside the model.
    input_format: str = "RGB"
    mean: Tuple[float, ...] = IMAGENET_MEAN
    std: Tuple[float, ...] = IMAGENET_STD

    @property
    def name(self) -> str:
        return f"{self.arch}.{self.tag}"

    @property
    def reference_dir(self) -> str:
        return re.sub(r"_\d{8}(_\d{6})?-[0-9a-f]{8}\.pth$", "", self.reference_file)

    @property
    def reference_url(self) -> str:
        return self.reference_url_at(REFERENCE_URL_ROOT)

    def reference_url_at(self, root: str) -> str:
        """The reference checkpoint's URL under another root (a mirror)."""
        return f"{root.rstrip('/')}/{self.reference_dir}/{self.reference_file}"

    @property
    def reference_sha256_prefix(self) -> str:
        return re.search(r"-([0-9a-f]{8})\.pth$", self.reference_file).group(1)
