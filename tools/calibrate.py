"""Calibration of randomly initialised detectors, for tests, benchmarks and export checks (not part
of the installed package: ``pythonpath`` in pyproject.toml puts tools/ on the tests' path).

With random weights HRNet's activations grow stage after stage, the RPN's box deltas explode and
every proposal is clipped away, so a timing would measure an empty pipeline. Calibration
re-estimates every batch norm's statistics on the given images and rescales each pyramid level to
unit standard deviation; with a score threshold of 0 every image then carries a full set of
detections, as a trained model does.
"""
from typing import List

import torch
from torch import Tensor, nn

from hrnetdet.inference.thresholds import set_score_threshold


@torch.no_grad()
def calibrate(model: nn.Module, images: List[Tensor], score_thresh: float = 0.0) -> nn.Module:
    """Re-estimate the backbone's batch-norm statistics on ``images`` (CHW floats in [0, 1]),
    scale every HRFPN output level to unit standard deviation and set ``score_thresh``.
    Works for hrnetdet's detectors and torchvision's FPN ones. Returns the model, in eval mode."""
    model.eval()
    x = model.transform(images)[0].tensors
    body, fpn = model.backbone.body, model.backbone.fpn
    bns = [m for m in body.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average: after one batch, exactly its statistics
        bn.train()
    body(x)
    for bn in bns:
        bn.momentum = 0.1
        bn.eval()
    # HRFPN's per-level convs, or torchvision FPN's output convs (so that torchvision's detectors
    # can be calibrated the same way for side-by-side benchmarks).
    convs = fpn.fpn_convs if hasattr(fpn, "fpn_convs") else [block[0] for block in fpn.layer_blocks]
    for conv, level in zip(convs, model.backbone(x).values()):
        std = level.std().clamp(min=1e-6)
        conv.weight /= std
        conv.bias /= std
    set_score_threshold(model, score_thresh)
    return model
