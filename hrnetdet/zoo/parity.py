"""Measured parity with the reference (mmdetection 3.3.0), per architecture, from the parity harness
(``tools/parity/``: seeded random weights made realistic, the reference's own inference on real photos,
the same checkpoint loaded here). ``matched`` is the lowest share, over the harness images, of the
reference's top-100 detections matched by hrnetdet's (same class, box IoU >= 0.98, score within 0.01;
masks of matched detections at IoU >= 0.9)."""

PARITY = {
    "faster_rcnn_hrnetv2p_w18": dict(matched=99.0, images=6, min_box_iou=0.9999, max_score_diff=1e-5),
    "mask_rcnn_hrnetv2p_w18": dict(matched=100.0, images=6, min_box_iou=0.9999, max_score_diff=2e-5,
                                   min_mask_iou=0.9848),
    "cascade_rcnn_hrnetv2p_w18": dict(matched=98.0, images=2, min_box_iou=0.9997, max_score_diff=5e-5),
    "cascade_rcnn_hrnetv2p_w32": dict(matched=100.0, images=2, min_box_iou=0.9997, max_score_diff=5e-5),
    "cascade_rcnn_hrnetv2p_w40": dict(matched=100.0, images=2, min_box_iou=0.9997, max_score_diff=5e-5),
    "cascade_mask_rcnn_hrnetv2p_w18": dict(matched=92.0, images=2, min_box_iou=0.9997, max_score_diff=5e-5,
                                           min_mask_iou=0.996),
    "cascade_mask_rcnn_hrnetv2p_w32": dict(matched=100.0, images=2, min_box_iou=0.9997, max_score_diff=5e-5,
                                           min_mask_iou=0.9815),
    "cascade_mask_rcnn_hrnetv2p_w40": dict(matched=100.0, images=2, min_box_iou=0.9997, max_score_diff=5e-5,
                                           min_mask_iou=0.9991),
    "htc_hrnetv2p_w18": dict(matched=100.0, images=2, min_box_iou=0.9997, max_score_diff=5e-5, min_mask_iou=0.9796),
    "htc_hrnetv2p_w32": dict(matched=100.0, images=2, min_box_iou=0.9997, max_score_diff=5e-5, min_mask_iou=0.9091),
    "htc_hrnetv2p_w40": dict(matched=100.0, images=2, min_box_iou=0.9997, max_score_diff=5e-5, min_mask_iou=0.9792),
    "fcos_hrnetv2p_w18": dict(matched=100.0, images=6, min_box_iou=1.0, max_score_diff=1e-5),
    "fcos_hrnetv2p_w32": dict(matched=100.0, images=2, min_box_iou=0.9998, max_score_diff=5e-5),
    "fcos_hrnetv2p_w40": dict(matched=100.0, images=2, min_box_iou=0.9998, max_score_diff=5e-5),
}


def parity_summary(arch: str) -> str:
    """One table cell: the measured parity of ``arch``, or 'pending'."""
    p = PARITY.get(arch)
    if p is None:
        return "pending"
    mask = f", mask IoU >= {p['min_mask_iou']:.3f}" if "min_mask_iou" in p else ""
    return f"{p['matched']:.0f}% matched ({p['images']} images{mask})"
