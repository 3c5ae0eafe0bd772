"""Measured parity with the reference (mmdetection 3.3.0), per architecture, from the parity harness
(``tools/parity/``: seeded random weights made realistic, the reference's own inference on real photos,
the same checkpoint loaded here). ``matched`` is the lowest share, over the harness images, of the
reference's top-100 detections matched by hrnetdet's (same class, box IoU >= 0.98, score within 0.01;
masks of matched detections at IoU >= 0.9)."""
import math

PARITY = {
    "faster_rcnn_hrnetv2p_w18": dict(matched=100.0, images=6, min_box_iou=0.9999, max_score_diff=1e-05),
    "faster_rcnn_hrnetv2p_w32": dict(matched=100.0, images=6, min_box_iou=0.9999, max_score_diff=2e-05),
    "faster_rcnn_hrnetv2p_w40": dict(matched=100.0, images=6, min_box_iou=0.9999, max_score_diff=1e-05),
    "mask_rcnn_hrnetv2p_w18": dict(matched=100.0, images=6, min_box_iou=0.9999, max_score_diff=8e-06,
                                   min_mask_iou=0.9999),
    "mask_rcnn_hrnetv2p_w32": dict(matched=100.0, images=6, min_box_iou=0.9999, max_score_diff=8e-06,
                                   min_mask_iou=0.9955),
    "mask_rcnn_hrnetv2p_w40": dict(matched=100.0, images=6, min_box_iou=0.9998, max_score_diff=2e-05,
                                   min_mask_iou=0.9875),
    "cascade_rcnn_hrnetv2p_w18": dict(matched=100.0, images=6, min_box_iou=0.9999, max_score_diff=1e-05),
    "cascade_rcnn_hrnetv2p_w32": dict(matched=100.0, images=6, min_box_iou=0.9999, max_score_diff=2e-05),
    "cascade_rcnn_hrnetv2p_w40": dict(matched=100.0, images=6, min_box_iou=0.9999, max_score_diff=2e-05),
    "cascade_mask_rcnn_hrnetv2p_w18": dict(matched=100.0, images=6, min_box_iou=0.9999, max_score_diff=3e-05,
                                           min_mask_iou=0.9992),
    "cascade_mask_rcnn_hrnetv2p_w32": dict(matched=100.0, images=6, min_box_iou=0.9999, max_score_diff=2e-05,
                                           min_mask_iou=0.9979),
    "cascade_mask_rcnn_hrnetv2p_w40": dict(matched=100.0, images=6, min_box_iou=0.9998, max_score_diff=1e-05,
                                           min_mask_iou=0.9993),
    "htc_hrnetv2p_w18": dict(matched=93.0, images=6, min_box_iou=0.9994, max_score_diff=8e-06,
                             min_mask_iou=0.9996),
    "htc_hrnetv2p_w32": dict(matched=100.0, images=6, min_box_iou=0.9999, max_score_diff=1e-05,
                             min_mask_iou=0.9964),
    "htc_hrnetv2p_w40": dict(matched=100.0, images=6, min_box_iou=0.9999, max_score_diff=1e-05,
                             min_mask_iou=0.9973),
    "fcos_hrnetv2p_w18": dict(matched=100.0, images=6, min_box_iou=0.9999, max_score_diff=4e-06),
    "fcos_hrnetv2p_w32": dict(matched=100.0, images=6, min_box_iou=0.9999, max_score_diff=4e-06),
    "fcos_hrnetv2p_w40": dict(matched=100.0, images=6, min_box_iou=0.9999, max_score_diff=6e-06),
}


def parity_summary(arch: str) -> str:
    """One table cell: the measured parity of ``arch``, or 'pending'."""
    p = PARITY.get(arch)
    if p is None:
        return "pending"
    # Floored, so that a rounded figure never claims more than was measured.
    mask = f", mask IoU >= {math.floor(p['min_mask_iou'] * 1000) / 1000:.3f}" if "min_mask_iou" in p else ""
    return f"{p['matched']:.0f}% matched ({p['images']} images{mask})"
