"""The model table: every family hrnetdet builds and every checkpoint the reference publishes
. The registry, factories, hubconf, CLI and MODEL_ZOO.md all read from here; it imports no torch
(builders and conversion rules are named, and imported on first use)."""
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Tuple

from ..detectors.settings import CascadeSettings, FCOSSettings, HTCSettings, RCNNSettings
from .recipe import FCOS_RECIPE
from .records import Family, PretrainedCfg, ReferenceLayout, Rule
from .registry import register_family, register_pretrained


def _rules(compose: Callable[[Any], Iterable[Rule]]) -> Callable[[], Tuple[Rule, ...]]:
    """A family's conversion rules, composed from zoo/convert.py's on first use (convert imports
    torch; this table, which ``hrnetdet models`` reads, does not)."""
    def make() -> Tuple[Rule, ...]:
        from . import convert
        return tuple(compose(convert))
    return make


RCNN_CLASSIFIER = "roi_head.bbox_head.fc_cls.weight"
CASCADE_CLASSIFIER = "roi_head.bbox_head.0.fc_cls.weight"

# Each family with the reference's checkpoint layout: the rules, a key only its checkpoints have
# (with none of the excluded ones) and the classifier whose rows count the classes.
FAMILIES = (
    Family("faster_rcnn", "Faster R-CNN", "hrnetdet.detectors.rcnn:build_rcnn", RCNNSettings, ReferenceLayout(
        _rules(lambda c: (*c.BACKBONE_RULES, *c.RPN_RULES, *c.BOX_HEAD_RULES)), RCNN_CLASSIFIER,
        ("roi_head.mask_head.conv_logits.weight",), RCNN_CLASSIFIER)),
    Family("mask_rcnn", "Mask R-CNN", "hrnetdet.detectors.rcnn:build_rcnn", RCNNSettings, ReferenceLayout(
        _rules(lambda c: (*c.BACKBONE_RULES, *c.RPN_RULES, *c.BOX_HEAD_RULES, *c.MASK_HEAD_RULES)),
        "roi_head.mask_head.conv_logits.weight",
        (), RCNN_CLASSIFIER), has_masks=True),
    Family("cascade_rcnn", "Cascade R-CNN", "hrnetdet.detectors.cascade:build_cascade_rcnn", CascadeSettings, ReferenceLayout(
        _rules(lambda c: (*c.BACKBONE_RULES, *c.RPN_RULES, *c.CASCADE_BOX_RULES)), CASCADE_CLASSIFIER,
        ("roi_head.mask_head.0.conv_logits.weight",), CASCADE_CLASSIFIER)),
    Family("cascade_mask_rcnn", "Cascade Mask R-CNN", "hrnetdet.detectors.cascade:build_cascade_rcnn", CascadeSettings, ReferenceLayout(
        _rules(lambda c: (*c.BACKBONE_RULES, *c.RPN_RULES, *c.CASCADE_BOX_RULES, *c.cascade_mask_rules(""))),
        "roi_head.mask_head.0.conv_logits.weight", ("roi_head.mask_head.1.conv_res.conv.weight",),
        CASCADE_CLASSIFIER), has_masks=True),
    Family("htc", "Hybrid Task Cascade", "hrnetdet.detectors.cascade:build_htc", HTCSettings, ReferenceLayout(
        _rules(lambda c: (*c.BACKBONE_RULES, *c.RPN_RULES, *c.CASCADE_BOX_RULES, *c.HTC_RULES)),
        "roi_head.mask_head.1.conv_res.conv.weight",
        (), CASCADE_CLASSIFIER), has_masks=True),
    # The reference's FCOS was trained on BGR input and has sigmoid classifiers (no background row).
    Family("fcos", "FCOS", "hrnetdet.detectors.fcos:build_fcos", FCOSSettings, ReferenceLayout(
        _rules(lambda c: c.FCOS_RULES), "bbox_head.conv_centerness.weight", (), "bbox_head.conv_cls.weight",
        background_row=False, bgr_input=True), recipe=FCOS_RECIPE),
)

# (arch, tag, reference checkpoint file, schedule, multi-scale training, published metrics).
# Metrics are the reference's: COCO val2017 box/mask AP, training memory (GB per GPU), V100 fps.
PUBLISHED = (
    ("faster_rcnn_hrnetv2p_w18", "coco_1x", "faster_rcnn_hrnetv2p_w18_1x_coco_20200130-56651a6d.pth", "1x", False, dict(box_ap=36.9, train_mem_gb=6.6, fps=13.4)),
    ("faster_rcnn_hrnetv2p_w18", "coco_2x", "faster_rcnn_hrnetv2p_w18_2x_coco_20200702_085731-a4ec0611.pth", "2x", False, dict(box_ap=38.9, train_mem_gb=6.6)),
    ("faster_rcnn_hrnetv2p_w32", "coco_1x", "faster_rcnn_hrnetv2p_w32_1x_coco_20200130-6e286425.pth", "1x", False, dict(box_ap=40.2, train_mem_gb=9.0, fps=12.4)),
    ("faster_rcnn_hrnetv2p_w32", "coco_2x", "faster_rcnn_hrnetv2p_w32_2x_coco_20200529_015927-976a9c15.pth", "2x", False, dict(box_ap=41.4, train_mem_gb=9.0)),
    ("faster_rcnn_hrnetv2p_w40", "coco_1x", "faster_rcnn_hrnetv2p_w40_1x_coco_20200210-95c1f5ce.pth", "1x", False, dict(box_ap=41.2, train_mem_gb=10.4, fps=10.5)),
    ("faster_rcnn_hrnetv2p_w40", "coco_2x", "faster_rcnn_hrnetv2p_w40_2x_coco_20200512_161033-0f236ef4.pth", "2x", False, dict(box_ap=42.1, train_mem_gb=10.4)),
    ("mask_rcnn_hrnetv2p_w18", "coco_1x", "mask_rcnn_hrnetv2p_w18_1x_coco_20200205-1c3d78ed.pth", "1x", False, dict(box_ap=37.7, mask_ap=34.2, train_mem_gb=7.0, fps=11.7)),
    ("mask_rcnn_hrnetv2p_w18", "coco_2x", "mask_rcnn_hrnetv2p_w18_2x_coco_20200212-b3c825b1.pth", "2x", False, dict(box_ap=39.8, mask_ap=36.0, train_mem_gb=7.0)),
    ("mask_rcnn_hrnetv2p_w32", "coco_1x", "mask_rcnn_hrnetv2p_w32_1x_coco_20200207-b29f616e.pth", "1x", False, dict(box_ap=41.2, mask_ap=37.1, train_mem_gb=9.4, fps=11.3)),
    ("mask_rcnn_hrnetv2p_w32", "coco_2x", "mask_rcnn_hrnetv2p_w32_2x_coco_20200213-45b75b4d.pth", "2x", False, dict(box_ap=42.5, mask_ap=37.8, train_mem_gb=9.4)),
    ("mask_rcnn_hrnetv2p_w40", "coco_1x", "mask_rcnn_hrnetv2p_w40_1x_coco_20200511_015646-66738b35.pth", "1x", False, dict(box_ap=42.1, mask_ap=37.5, train_mem_gb=10.9)),
    ("mask_rcnn_hrnetv2p_w40", "coco_2x", "mask_rcnn_hrnetv2p_w40_2x_coco_20200512_163732-aed5e4ab.pth", "2x", False, dict(box_ap=42.8, mask_ap=38.2, train_mem_gb=10.9)),
    ("cascade_rcnn_hrnetv2p_w18", "coco_20e", "cascade_rcnn_hrnetv2p_w18_20e_coco_20200210-434be9d7.pth", "20e", False, dict(box_ap=41.2, train_mem_gb=7.0, fps=11.0)),
    ("cascade_rcnn_hrnetv2p_w32", "coco_20e", "cascade_rcnn_hrnetv2p_w32_20e_coco_20200208-928455a4.pth", "20e", False, dict(box_ap=43.3, train_mem_gb=9.4, fps=11.0)),
    ("cascade_rcnn_hrnetv2p_w40", "coco_20e", "cascade_rcnn_hrnetv2p_w40_20e_coco_20200512_161112-75e47b04.pth", "20e", False, dict(box_ap=43.8, train_mem_gb=10.8)),
    ("cascade_mask_rcnn_hrnetv2p_w18", "coco_20e", "cascade_mask_rcnn_hrnetv2p_w18_20e_coco_20200210-b543cd2b.pth", "20e", False, dict(box_ap=41.6, mask_ap=36.4, train_mem_gb=8.5, fps=8.5)),
    ("cascade_mask_rcnn_hrnetv2p_w32", "coco_20e", "cascade_mask_rcnn_hrnetv2p_w32_20e_coco_20200512_154043-39d9cf7b.pth", "20e", False, dict(box_ap=44.3, mask_ap=38.6, fps=8.3)),
    ("cascade_mask_rcnn_hrnetv2p_w40", "coco_20e", "cascade_mask_rcnn_hrnetv2p_w40_20e_coco_20200527_204922-969c4610.pth", "20e", False, dict(box_ap=45.1, mask_ap=39.3, train_mem_gb=12.5)),
    ("htc_hrnetv2p_w18", "coco_20e", "htc_hrnetv2p_w18_20e_coco_20200210-b266988c.pth", "20e", False, dict(box_ap=42.8, mask_ap=37.9, train_mem_gb=10.8, fps=4.7)),
    ("htc_hrnetv2p_w32", "coco_20e", "htc_hrnetv2p_w32_20e_coco_20200207-7639fa12.pth", "20e", False, dict(box_ap=45.4, mask_ap=39.9, train_mem_gb=13.1, fps=4.9)),
    ("htc_hrnetv2p_w40", "coco_20e", "htc_hrnetv2p_w40_20e_coco_20200529_183411-417c4d5b.pth", "20e", False, dict(box_ap=46.4, mask_ap=40.8, train_mem_gb=14.6)),
    ("fcos_hrnetv2p_w18", "coco_1x", "fcos_hrnetv2p_w18_gn-head_4x4_1x_coco_20201212_100710-4ad151de.pth", "1x", False, dict(box_ap=35.3, train_mem_gb=13.0, fps=12.9)),
    ("fcos_hrnetv2p_w18", "coco_2x", "fcos_hrnetv2p_w18_gn-head_4x4_2x_coco_20201212_101110-5c575fa5.pth", "2x", False, dict(box_ap=38.2, train_mem_gb=13.0)),
    ("fcos_hrnetv2p_w32", "coco_1x", "fcos_hrnetv2p_w32_gn-head_4x4_1x_coco_20201211_134730-cb8055c0.pth", "1x", False, dict(box_ap=39.5, train_mem_gb=17.5, fps=12.9)),
    ("fcos_hrnetv2p_w32", "coco_2x", "fcos_hrnetv2p_w32_gn-head_4x4_2x_coco_20201212_112133-77b6b9bb.pth", "2x", False, dict(box_ap=40.8, train_mem_gb=17.5)),
    ("fcos_hrnetv2p_w18", "coco_ms_2x", "fcos_hrnetv2p_w18_gn-head_mstrain_640-800_4x4_2x_coco_20201212_111651-441e9d9f.pth", "2x", True, dict(box_ap=38.3, train_mem_gb=13.0, fps=12.9)),
    ("fcos_hrnetv2p_w32", "coco_ms_2x", "fcos_hrnetv2p_w32_gn-head_mstrain_640-800_4x4_2x_coco_20201212_090846-b6f2b49f.pth", "2x", True, dict(box_ap=41.9, train_mem_gb=17.5, fps=12.4)),
    # The reference's README labels this row W48; its config and checkpoint are W40
    # (docs/NUMERICS.md, 'The W48 FCOS row').
    ("fcos_hrnetv2p_w40", "coco_ms_2x", "fcos_hrnetv2p_w40_gn-head_mstrain_640-800_4x4_2x_coco_20201212_124752-f22d2ce5.pth", "2x", True, dict(box_ap=42.7, train_mem_gb=20.3, fps=10.8)),
)


# Where tools/publish_zoo.py put each weight set on the Hub: {"arch.tag": {hf_hub_id, hf_revision, sha256}}.
HUB_FILE = Path(__file__).with_name("published.json")


def hub_fields(path: Path = HUB_FILE) -> dict:
    """The Hub fields of every published weight set, overlaid on its record below."""
    return json.loads(path.read_text())


def _register() -> None:
    for family in FAMILIES:
        register_family(family)
    hub = hub_fields()
    for arch, tag, file, schedule, ms, metrics in PUBLISHED:
        register_pretrained(PretrainedCfg(arch, tag, file, metrics, schedule, ms, **hub.get(f"{arch}.{tag}", {})))


_register()
