"""Stand-in for ``mmcv.ops`` when only ``mmcv-lite`` (no compiled ``mmcv._ext``) is installed.

Import this module BEFORE anything from mmdet:

    import mmcv_ops_standin  # noqa: F401  (installs itself into sys.modules)
    import mmdet.apis

What is real (CPU, inference-grade, mmcv 2.1 semantics):
  * ``nms``            -- torchvision.ops.nms (same IoU, same ``>`` suppression, ``offset`` honoured by
                          shifting x2/y2 by +offset, ``score_threshold`` / ``max_num`` as in mmcv's NMSop).
  * ``batched_nms``    -- a line-by-line port of mmcv 2.1 ``mmcv/ops/nms.py::batched_nms`` (the
                          "offset boxes per class" trick below ``split_thr``, the per-class loop above it,
                          ``class_agnostic`` in the cfg overriding the argument, ``nms_cfg=None`` = sort only).
  * ``roi_align`` / ``RoIAlign`` -- torchvision.ops.roi_align, exactly like mmcv's own
                          ``RoIAlign(use_torchvision=True)`` path (``aligned``, ``sampling_ratio`` <= 0 adaptive,
                          ``pool_mode='avg'`` only).
Everything else that mmdet / mmengine import from ``mmcv.ops`` at import time is a placeholder: the
name exists (classes are real ``nn.Module`` subclasses so ``isinstance`` checks work), but calling a
function or instantiating a class raises ``NotImplementedError``.

mmcv has no ``multiclass_nms``; mmdet 3.3 uses its own ``mmdet.models.layers.multiclass_nms``, which calls
``batched_nms`` from here.
"""
import sys
import types
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torchvision
from torch import Tensor
from torch.nn.modules.utils import _pair

import mmcv  # the mmcv-lite package itself (pure Python parts)

__all__ = ['install', 'nms', 'batched_nms', 'roi_align', 'RoIAlign']


# ----------------------------------------------------------------------------------------------- NMS
def nms(boxes, scores, iou_threshold: float = None, offset: int = 0, score_threshold: float = 0,
        max_num: int = -1, iou_thr: float = None):
    """mmcv.ops.nms: returns (dets [K,5] = boxes + score column, keep indices), same type as input."""
    if iou_threshold is None:
        iou_threshold = iou_thr  # mmcv's deprecated alias
    assert isinstance(boxes, (Tensor, np.ndarray)) and isinstance(scores, (Tensor, np.ndarray))
    is_numpy = isinstance(boxes, np.ndarray)
    if is_numpy:
        boxes = torch.from_numpy(boxes)
    if isinstance(scores, np.ndarray):
        scores = torch.from_numpy(scores)
    assert boxes.size(1) == 4 and boxes.size(0) == scores.size(0)
    assert offset in (0, 1)

    b, s = boxes, scores
    filtering = score_threshold > 0
    if filtering:
        valid_mask = s > score_threshold
        b, s = b[valid_mask], s[valid_mask]
        valid_inds = torch.nonzero(valid_mask, as_tuple=False).squeeze(dim=1)
    if offset:
        # (x2 - x1 + 1) widths == plain widths of boxes whose x2/y2 are shifted by +1
        b = b + b.new_tensor([0.0, 0.0, float(offset), float(offset)])
    inds = torchvision.ops.nms(b, s, float(iou_threshold))
    if max_num > 0:
        inds = inds[:max_num]
    if filtering:
        inds = valid_inds[inds]

    dets = torch.cat((boxes[inds], scores[inds].reshape(-1, 1)), dim=1)
    if is_numpy:
        return dets.cpu().numpy(), inds.cpu().numpy()
    return dets, inds


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, nms_cfg: Optional[Dict],
                class_agnostic: bool = False) -> Tuple[Tensor, Tensor]:
    """Port of mmcv 2.1 ``batched_nms`` (Python part verbatim apart from the op lookup)."""
    if nms_cfg is None:
        scores, inds = scores.sort(descending=True)
        boxes = boxes[inds]
        return torch.cat([boxes, scores[:, None]], -1), inds

    nms_cfg_ = nms_cfg.copy()
    class_agnostic = nms_cfg_.pop('class_agnostic', class_agnostic)
    if class_agnostic:
        boxes_for_nms = boxes
    else:
        if boxes.size(-1) == 5:  # rotated boxes: offset centres only
            max_coordinate = boxes[..., :2].max() + boxes[..., 2:4].max()
            offsets = idxs.to(boxes) * (max_coordinate + torch.tensor(1).to(boxes))
            boxes_ctr_for_nms = boxes[..., :2] + offsets[:, None]
            boxes_for_nms = torch.cat([boxes_ctr_for_nms, boxes[..., 2:5]], dim=-1)
        else:
            max_coordinate = boxes.max()
            offsets = idxs.to(boxes) * (max_coordinate + torch.tensor(1).to(boxes))
            boxes_for_nms = boxes + offsets[:, None]

    nms_op = nms_cfg_.pop('type', 'nms')
    if isinstance(nms_op, str):
        if nms_op not in _NMS_OPS:
            raise NotImplementedError(f'mmcv_ops_standin: nms type {nms_op!r} is not available')
        nms_op = _NMS_OPS[nms_op]

    split_thr = nms_cfg_.pop('split_thr', 10000)
    if boxes_for_nms.shape[0] < split_thr:
        dets, keep = nms_op(boxes_for_nms, scores, **nms_cfg_)
        boxes = boxes[keep]
        scores = dets[:, -1]
    else:
        max_num = nms_cfg_.pop('max_num', -1)
        total_mask = scores.new_zeros(scores.size(), dtype=torch.bool)
        scores_after_nms = scores.new_zeros(scores.size())
        for id in torch.unique(idxs):
            mask = (idxs == id).nonzero(as_tuple=False).view(-1)
            dets, keep = nms_op(boxes_for_nms[mask], scores[mask], **nms_cfg_)
            total_mask[mask[keep]] = True
            scores_after_nms[mask[keep]] = dets[:, -1]
        keep = total_mask.nonzero(as_tuple=False).view(-1)

        scores, inds = scores_after_nms[keep].sort(descending=True)
        keep = keep[inds]
        boxes = boxes[keep]

        if max_num > 0:
            keep = keep[:max_num]
            boxes = boxes[:max_num]
            scores = scores[:max_num]

    boxes = torch.cat([boxes, scores[:, None]], -1)
    return boxes, keep


# ------------------------------------------------------------------------------------------ RoIAlign
def roi_align(input: Tensor, rois: Tensor, output_size, spatial_scale: float = 1.0,
              sampling_ratio: int = 0, pool_mode: str = 'avg', aligned: bool = True) -> Tensor:
    """mmcv.ops.roi_align signature; rois are [K, 5] (batch_idx, x1, y1, x2, y2)."""
    if pool_mode != 'avg':
        raise NotImplementedError("mmcv_ops_standin: roi_align only supports pool_mode='avg'")
    assert rois.size(1) == 5, 'RoI must be (idx, x1, y1, x2, y2)!'
    # torchvision treats sampling_ratio <= 0 as adaptive (ceil(roi_size / output_size)), like mmcv's 0.
    return torchvision.ops.roi_align(input, rois.to(input.dtype), _pair(output_size),
                                     float(spatial_scale), int(sampling_ratio), bool(aligned))


class RoIAlign(nn.Module):
    def __init__(self, output_size, spatial_scale: float = 1.0, sampling_ratio: int = 0,
                 pool_mode: str = 'avg', aligned: bool = True, use_torchvision: bool = False,
                 out_size=None, sample_num=None):
        super().__init__()
        if out_size is not None:  # mmcv's deprecated aliases
            output_size = out_size
        if sample_num is not None:
            sampling_ratio = sample_num
        if pool_mode != 'avg':
            raise NotImplementedError("mmcv_ops_standin: RoIAlign only supports pool_mode='avg'")
        self.output_size = _pair(output_size)
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.pool_mode = pool_mode
        self.aligned = aligned
        self.use_torchvision = use_torchvision

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:
        return roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio,
                         self.pool_mode, self.aligned)

    def __repr__(self):
        return (f'{self.__class__.__name__}(output_size={self.output_size}, '
                f'spatial_scale={self.spatial_scale}, sampling_ratio={self.sampling_ratio}, '
                f'pool_mode={self.pool_mode}, aligned={self.aligned}, '
                f'use_torchvision={self.use_torchvision}) [mmcv_ops_standin -> torchvision]')


# ------------------------------------------------------------------------------------- placeholders
def _placeholder_fn(name):
    def fn(*args, **kwargs):
        raise NotImplementedError(f'mmcv.ops.{name} is not available (mmcv-lite + mmcv_ops_standin)')
    fn.__name__ = name
    return fn


def _placeholder_cls(name):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError(f'mmcv.ops.{name} is not available (mmcv-lite + mmcv_ops_standin)')
    return type(name, (nn.Module,), {'__init__': __init__, '__module__': 'mmcv.ops'})


# name -> submodule(s) it is imported from besides mmcv.ops itself (found by scanning mmdet 3.3,
# mmengine 0.10 and mmcv-lite 2.1 for `from mmcv.ops[.x] import ...`)
_PLACEHOLDER_CLASSES = {
    'DeformConv2d': ['deform_conv'], 'DeformConv2dPack': ['deform_conv'],
    'ModulatedDeformConv2d': ['modulated_deform_conv'], 'ModulatedDeformConv2dPack': ['modulated_deform_conv'],
    'MaskedConv2d': ['masked_conv'], 'CARAFEPack': ['carafe'], 'CornerPool': ['corner_pool'],
    'MultiScaleDeformableAttention': ['multi_scale_deform_attn'], 'RoIPool': ['roi_pool'],
    'SyncBatchNorm': ['sync_bn'], 'SigmoidFocalLoss': ['focal_loss'], 'SoftmaxFocalLoss': ['focal_loss'],
    'GlobalPoolingCell': ['merge_cells'], 'SumCell': ['merge_cells'], 'ConcatCell': ['merge_cells'],
}
_PLACEHOLDER_FUNCS = {
    'deform_conv2d': ['deform_conv'], 'modulated_deform_conv2d': ['modulated_deform_conv'],
    'sigmoid_focal_loss': ['focal_loss'], 'softmax_focal_loss': ['focal_loss'],
    'point_sample': ['point_sample'], 'rel_roi_point_to_rel_img_point': ['point_sample'],
    'nms_match': ['nms'], 'soft_nms': ['nms'], 'nms_rotated': ['nms'], 'roi_pool': ['roi_pool'],
}
_REAL = {'nms': ['nms'], 'batched_nms': ['nms'], 'roi_align': ['roi_align'], 'RoIAlign': ['roi_align']}

_NMS_OPS = {'nms': nms, 'soft_nms': _placeholder_fn('soft_nms')}


def _real_objects():
    return {'nms': nms, 'batched_nms': batched_nms, 'roi_align': roi_align, 'RoIAlign': RoIAlign}


def install():
    """Register ``mmcv.ops`` (and the submodules mmdet imports from) in ``sys.modules``. Idempotent."""
    if getattr(sys.modules.get('mmcv.ops'), '__standin__', False):
        return sys.modules['mmcv.ops']
    ops = types.ModuleType('mmcv.ops')
    ops.__standin__ = True
    ops.__doc__ = __doc__
    ops.__path__ = []  # make it a package so `import mmcv.ops.nms` resolves via sys.modules
    submodules = {}

    def put(name, obj, subs):
        setattr(ops, name, obj)
        for sub in subs:
            full = f'mmcv.ops.{sub}'
            if full not in submodules:
                submodules[full] = types.ModuleType(full)
            setattr(submodules[full], name, obj)

    real = _real_objects()
    for name, subs in _REAL.items():
        put(name, real[name], subs)
    for name, subs in _PLACEHOLDER_CLASSES.items():
        put(name, _placeholder_cls(name), subs)
    for name, subs in _PLACEHOLDER_FUNCS.items():
        put(name, _placeholder_fn(name), subs)
    ops.get_compiler_version = lambda: 'n/a (mmcv-lite + mmcv_ops_standin)'
    ops.get_compiling_cuda_version = lambda: 'n/a (mmcv-lite + mmcv_ops_standin)'

    sys.modules['mmcv.ops'] = ops
    for full, mod in submodules.items():
        sys.modules[full] = mod
        if not hasattr(ops, full.rsplit('.', 1)[1]):  # like real mmcv: `nms`, `roi_align` stay functions
            setattr(ops, full.rsplit('.', 1)[1], mod)
    mmcv.ops = ops
    return ops


install()
