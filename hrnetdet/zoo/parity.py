"""Measured parity with the reference (mmdetection 3.3.0), per architecture, from the parity harness
(``tools/parity/``: seeded random weights made realistic, the reference's own inference on real photos,
the same checkpoint loaded here). ``parity.json`` beside this file holds the figures, written by
``tools/parity/compare.py --record``: ``matched`` is the lowest share, over the harness images, of the
reference's top-100 detections matched by hrnetdet's (same class, box IoU, score and mask IoU
within the thresholds of ``hrnetdet.inference.match``)."""
import json
import math
from pathlib import Path

PARITY = json.loads((Path(__file__).with_name("parity.json")).read_text())
# One training step per family at W18 (tools/parity/train_compare.py --record): each loss term's and the
# worst parameter gradient's relative difference from the reference, both sides in float64.
TRAIN_PARITY = json.loads((Path(__file__).with_name("train_parity.json")).read_text())


def parity_summary(arch: str) -> str:
    """One table cell: the measured parity of ``arch``, or 'pending'."""
    p = PARITY.get(arch)
    if p is None:
        return "pending"
    # Floored, so that a rounded figure never claims more than was measured.
    mask = f", mask IoU >= {math.floor(p['min_mask_iou'] * 1000) / 1000:.3f}" if "min_mask_iou" in p else ""
    return f"{p['matched']:.0f}% matched ({p['images']} images{mask})"


def train_parity_summary(arch: str) -> str:
    """One table cell: the training-step parity of ``arch``'s family (measured at W18), or 'pending'."""
    w18 = arch.rsplit("_w", 1)[0] + "_w18"
    p = TRAIN_PARITY.get(w18)
    if p is None:
        return "pending"
    return (f"{'W18: ' if arch != w18 else ''}losses <= {max(p['losses'].values()):.1g},"
            f" gradients <= {p['worst_grad_rel_diff']:.1g}")
