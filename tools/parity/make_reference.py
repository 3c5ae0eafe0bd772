#!/usr/bin/env python
"""Reference side of the parity harness: mmdetection 3.3 itself, with seeded, calibrated random weights.

Run with the reference venv (see setup_reference_env.sh):

    /work/parity_env/bin/python tools/parity/make_reference.py --models faster_rcnn_hrnetv2p_w18 --out /work/parity_artifacts
    /work/parity_env/bin/python tools/parity/make_reference.py --models all --out /work/parity_artifacts

For each model it
  1. builds the detector from mmdet's OWN packaged config (``mmdet/.mim/configs/hrnet/...``) with
     ``init_detector(cfg, checkpoint=None)`` (backbone ``init_cfg=None``: nothing is downloaded), seeds torch and
     runs ``model.init_weights()``;
  2. makes the random weights "realistic": random BN/GN affine parameters; BN running statistics calibrated on
     the harness images (cumulative average, backbone BNs in train mode, inputs from the config's own test
     pipeline + data preprocessor); neck convs rescaled to zero-mean/unit-std outputs; RPN / RoI / FCOS / mask /
     semantic layers rescaled to fixed output spreads; the classifier's background bias (FCOS: the class bias)
     bisected so that about --target-dets detections per image survive the config's score threshold;
  3. saves ``checkpoint.pth`` exactly as mmdetection publishes checkpoints ({'meta', 'state_dict'}), after
     checking its keys/shapes/parameter counts against the key listing ``APPENDIX`` (the same file as
     tests/data/mmdet_hrnet_keys_appendix.txt);
  4. reloads that file into a FRESH model (``init_detector(cfg, checkpoint.pth)``) and runs the reference's own
     ``inference_detector`` on every harness image; stores the detections in ``reference.pt`` and a record in
     ``info.json``.
Output: <out>/images/*.png (shared with the hrnetdet side) and <out>/<model>/{checkpoint.pth, reference.pt, info.json}.
"""
import argparse
import copy
import hashlib
import json
import logging
import math
import os
import platform
import re
import shutil
import sys
import time
import traceback
import types
import warnings
from collections import OrderedDict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import mmcv_ops_standin  # noqa: E402,F401  (must precede mmdet)

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import mmcv  # noqa: E402
import mmdet  # noqa: E402
import mmengine  # noqa: E402
from mmengine import Config  # noqa: E402
from mmengine.dataset import Compose  # noqa: E402
from mmengine.logging import MMLogger  # noqa: E402
from mmdet.apis import inference_detector, init_detector  # noqa: E402
from mmdet.utils import get_test_pipeline_cfg  # noqa: E402

from compare import masks_to_rle, match_detections  # noqa: E402

warnings.filterwarnings('ignore')
MMLogger.get_instance('mmengine', log_level='WARNING')
logging.getLogger('mmengine').setLevel(logging.WARNING)

CONFIG_ROOT = os.path.join(os.path.dirname(mmdet.__file__), '.mim', 'configs', 'hrnet')
APPENDIX = '/work/shared/reference/mmdet_hrnet_keys_appendix.txt'

# family -> width -> mmdet 3.3 config file (1x for Faster/Mask and plain FCOS, 20e for the cascades,
# FCOS W40 only exists as the multi-scale-train 2x config; test-time behaviour is the same for 1x/2x/ms).
CONFIGS = {
    'faster_rcnn': {18: 'faster-rcnn_hrnetv2p-w18-1x_coco.py', 32: 'faster-rcnn_hrnetv2p-w32-1x_coco.py',
                    40: 'faster-rcnn_hrnetv2p-w40-1x_coco.py'},
    'mask_rcnn': {18: 'mask-rcnn_hrnetv2p-w18-1x_coco.py', 32: 'mask-rcnn_hrnetv2p-w32-1x_coco.py',
                  40: 'mask-rcnn_hrnetv2p-w40_1x_coco.py'},
    'cascade_rcnn': {18: 'cascade-rcnn_hrnetv2p-w18-20e_coco.py', 32: 'cascade-rcnn_hrnetv2p-w32-20e_coco.py',
                     40: 'cascade-rcnn_hrnetv2p-w40-20e_coco.py'},
    'cascade_mask_rcnn': {18: 'cascade-mask-rcnn_hrnetv2p-w18_20e_coco.py',
                          32: 'cascade-mask-rcnn_hrnetv2p-w32_20e_coco.py',
                          40: 'cascade-mask-rcnn_hrnetv2p-w40-20e_coco.py'},
    'htc': {18: 'htc_hrnetv2p-w18_20e_coco.py', 32: 'htc_hrnetv2p-w32_20e_coco.py',
            40: 'htc_hrnetv2p-w40_20e_coco.py'},
    'fcos': {18: 'fcos_hrnetv2p-w18-gn-head_4xb4-1x_coco.py', 32: 'fcos_hrnetv2p-w32-gn-head_4xb4-1x_coco.py',
             40: 'fcos_hrnetv2p-w40-gn-head_ms-640-800-4xb4-2x_coco.py'},
}
APPENDIX_FAMILY = {'faster_rcnn': 'faster', 'mask_rcnn': 'mask', 'cascade_rcnn': 'cascade',
                   'cascade_mask_rcnn': 'cmask', 'htc': 'htc', 'fcos': 'fcos'}
ALL_MODELS = [f'{fam}_hrnetv2p_w{w}' for w in (18, 32, 40) for fam in CONFIGS]

# Harness images: real photos from skimage.data (bundled with scikit-image, no download).
IMAGES = OrderedDict([
    ('astronaut.png', lambda d: d.astronaut()),                   # 512 x 512
    ('coffee.png', lambda d: d.coffee()),                         # 400 x 600
    ('chelsea.png', lambda d: d.chelsea()),                       # 300 x 451
    ('rocket.png', lambda d: d.rocket()),                         # 427 x 640
    ('rocket_portrait.png', lambda d: d.rocket()[:, 180:460]),    # 427 x 280, portrait crop
    ('hubble_deep_field.png', lambda d: d.hubble_deep_field()),   # 872 x 1000, downscaled by the resize
])

# output spreads the calibration aims at
SPREAD = dict(
    rpn_cls_std=2.0,      # RPN objectness logits
    rpn_cls_absmax=10.0,  # ... bounded over all levels and images: sigmoid stays below 1.0 in float32 (no ties)
    rpn_reg_std=0.25,     # RPN deltas (coder stds are 1)
    fc_cls_std=3.0,       # R-CNN class logits (per stage)
    fc_reg_std=1.0,       # R-CNN raw deltas (before the coder's stds)
    mask_logit_std=4.0,   # mask logits: sharp, so tiny numeric differences rarely flip a pixel
    mask_conv_dc=3.0,     # DC component added to the mask heads' 3x3 conv kernels (smooth masks)
    mask_upsample_dc=10.0,  # ... and to the 2x2 deconv kernels (no checkerboard)
    fcos_cls_std=2.0, fcos_ctr_std=1.5, fcos_reg_std=0.08, fcos_reg_mean=1.0,  # log-distance std 0.08*scale
)
# backbone stability (see stabilize_backbone)
STABILITY = dict(conv1_dc=2.0, residual_gamma=0.2, running_var_floor=0.5)


def parse_model_name(name):
    m = re.fullmatch(r'(faster_rcnn|mask_rcnn|cascade_rcnn|cascade_mask_rcnn|htc|fcos)_hrnetv2p_w(18|32|40)', name)
    if not m:
        raise SystemExit(f'unknown model {name!r}; known: {", ".join(ALL_MODELS)}')
    return m.group(1), int(m.group(2))


# ------------------------------------------------------------------------------------------- images
def make_images(img_dir):
    import skimage
    import skimage.data as skd
    os.makedirs(img_dir, exist_ok=True)
    manifest = OrderedDict()
    for fname, fn in IMAGES.items():
        path = os.path.join(img_dir, fname)
        rgb = np.ascontiguousarray(fn(skd))
        assert rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.dtype == np.uint8, (fname, rgb.shape, rgb.dtype)
        if not os.path.exists(path):
            assert cv2.imwrite(path, rgb[:, :, ::-1].copy())
        back = cv2.imread(path, cv2.IMREAD_COLOR)[:, :, ::-1]
        if not np.array_equal(back, rgb):
            raise RuntimeError(f'{path} exists but differs from skimage.data (scikit-image {skimage.__version__})')
        manifest[fname] = dict(height=int(rgb.shape[0]), width=int(rgb.shape[1]),
                               sha256_rgb=hashlib.sha256(rgb.tobytes()).hexdigest(),
                               source=f'skimage.data (scikit-image {skimage.__version__})')
    with open(os.path.join(img_dir, 'manifest.json'), 'w') as f:
        json.dump(manifest, f, indent=1)
    return [os.path.join(img_dir, n) for n in IMAGES]


# -------------------------------------------------------------------------------------- calibration
def _affine_(module, a, b):
    """Rescale a conv/linear/deconv so that its output becomes a*out + b (b scalar or per-channel)."""
    with torch.no_grad():
        module.weight.mul_(a)
        assert module.bias is not None, module
        module.bias.mul_(a).add_(b if torch.is_tensor(b) else torch.full_like(module.bias, float(b)))


def _bshape(b, out):
    if torch.is_tensor(b) and b.dim() == 1:
        return b.view(1, -1, *([1] * (out.dim() - 2)))
    return b


class Tap:
    """Forward hook accumulating mean/std of a module's output over all calls (levels, images)."""

    def __init__(self, module, select=None):
        self.select, self.n, self.s, self.ss = select, 0, 0.0, 0.0
        self.h = module.register_forward_hook(self)

    def __call__(self, m, inp, out):
        o = out.detach().double()
        if self.select is not None:
            o = self.select(o)
        self.n += o.numel()
        self.s += float(o.sum())
        self.ss += float((o * o).sum())

    @property
    def mean(self):
        return self.s / self.n

    @property
    def std(self):
        return math.sqrt(max(self.ss / self.n - self.mean ** 2, 1e-24))

    def remove(self):
        self.h.remove()


class OnTheFly:
    """Forward hook that, on the module's FIRST call, measures its output, rescales the module's parameters
    and returns the rescaled output, so everything downstream in the same pass sees calibrated inputs.
    ``plan(out) -> (a, b, record)``."""

    def __init__(self, name, module, plan, log):
        self.name, self.module, self.plan, self.log, self.done = name, module, plan, log, False
        self.h = module.register_forward_hook(self)

    def __call__(self, m, inp, out):
        if self.done:
            return None
        a, b, rec = self.plan(out.detach().double())
        _affine_(m, a, b)
        self.done = True
        self.log[self.name] = rec
        b_ = b.to(out.dtype) if torch.is_tensor(b) else b
        return out * a + _bshape(b_, out)


def std_plan(tstd, tmean=0.0):
    def plan(o):
        mean, std = float(o.mean()), float(o.std())
        a = tstd / std
        b = 0.0 if tmean is None else tmean - a * mean
        return a, b, dict(mean_before=mean, std_before=std, scale=a, shift=b, target_std=tstd, target_mean=tmean)
    return plan


def channel_centred_plan(tstd):
    """std tstd overall, every output channel centred at 0 (mask logits: each class channel ~half on)."""
    def plan(o):
        std = float(o.std())
        a = tstd / std
        ch_mean = o.transpose(0, 1).reshape(o.shape[1], -1).mean(1)
        b = (-a * ch_mean).float()
        return a, b, dict(std_before=std, scale=a, channel_mean_before_absmax=float(ch_mean.abs().max()),
                          target_std=tstd)
    return plan


def smooth_kernels_(conv, gen, dc):
    """Add a per-(out, in) constant over the kernel window (dc x the weights' std): the conv then acts partly
    as a local average, so stacked random convs give spatially smooth maps. On the 2x2 stride-2 deconv it removes
    the checkerboard (a random deconv kernel stamps a 2x2-periodic pattern that, near the 0.5 threshold, turns
    masks into stripes and dots). Applied to the mask heads before their calibration."""
    with torch.no_grad():
        w = conv.weight
        w.add_(torch.randn(w.shape[0], w.shape[1], 1, 1, generator=gen) * float(w.std()) * dc)


def cls_plan(tstd, num_classes=80, bg_mean=0.0):
    """fc_cls [N, 81]: foreground logits -> std tstd, mean 0; background column -> std tstd, mean bg_mean."""
    def plan(o):
        fg, bg = o[:, :num_classes], o[:, num_classes]
        a = tstd / float(fg.std())
        b = torch.full((num_classes + 1,), -a * float(fg.mean()), dtype=torch.float32)
        b[num_classes] = bg_mean - a * float(bg.mean())
        return a, b, dict(fg_mean_before=float(fg.mean()), fg_std_before=float(fg.std()),
                          bg_mean_before=float(bg.mean()), scale=a, target_std=tstd, bg_target_mean=bg_mean)
    return plan


def randomize_norm_affine(model, gen, log):
    n = 0
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)) and m.affine:
                m.weight.copy_(torch.empty(m.weight.shape).uniform_(0.7, 1.3, generator=gen))
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
                n += 1
    log['norm_affine'] = dict(count=n, weight='U(0.7, 1.3)', bias='N(0, 0.1^2)')


def calibrate_bn(model, inputs, log):
    bns = [m for m in model.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.eval()
    for m in bns:
        m.train()
    with torch.no_grad():
        for x in inputs:
            model.backbone(x)
    for m in bns:
        m.momentum = 0.1
    model.eval()
    log['bn'] = dict(count=len(bns), images=len(inputs), mode='train-mode forward, momentum=None (cumulative)')


def feature_stats(feats):
    return [dict(shape=list(f.shape), mean=float(f.mean()), std=float(f.std())) for f in feats]


# --------------------------------------------------------------------------------------- the model
def build_model(cfg_path, seed, checkpoint=None):
    cfg = Config.fromfile(cfg_path)
    cfg.model.backbone.init_cfg = None
    torch.manual_seed(seed)
    np.random.seed(seed)
    model = init_detector(cfg, checkpoint, palette='coco', device='cpu')
    if checkpoint is None:
        model.init_weights()
    model.eval()
    return model, cfg


def prepare(model, pipeline, img_path):
    data = pipeline(dict(img_path=img_path, img_id=0))
    batch = model.data_preprocessor({'inputs': [data['inputs']], 'data_samples': [data['data_samples']]}, False)
    return batch['inputs'], batch['data_samples']


def bisect(count_fn, target, lo, hi, iters=14):
    """count_fn(delta) is non-increasing in delta; find delta with count closest to target."""
    best = None
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        c = count_fn(mid)
        if best is None or abs(c - target) < abs(best[1] - target):
            best = (mid, c)
        if c > target:
            lo = mid
        else:
            hi = mid
        if abs(c - target) <= 0.5:
            break
    return best


class _StopForward(Exception):
    pass


def stabilize_backbone(model, gen, log):
    """Random conv nets are far more sensitive to small input changes than trained ones (measured on W18: a
    relative input perturbation came out of the backbone ~40-60x larger; a cv2-vs-torch resize difference then
    changed every detection). Three trained-net-like properties bring the gain down to ~3x (measured on W18 crops):
      * conv1 filters get a per-(out, in) constant (DC) component, so they respond to image content more than to
        pixel-level noise, as learned first-layer filters do;
      * the last BN gamma of every residual branch (BasicBlock.norm2, Bottleneck.norm3) is scaled down, so
        blocks stay close to identity;
      * (after BN calibration) running_var is floored per layer at a fraction of its median, so near-dead
        channels are not blown up by 1/sqrt(var + eps)."""
    from mmdet.models.backbones.hrnet import BasicBlock
    from mmdet.models.backbones.resnet import Bottleneck
    bb = model.backbone
    with torch.no_grad():
        w = bb.conv1.weight
        w.add_(torch.randn(w.shape[0], w.shape[1], 1, 1, generator=gen) * float(w.std()) * STABILITY['conv1_dc'])
        n = 0
        for m in bb.modules():
            if isinstance(m, BasicBlock):
                m.norm2.weight.mul_(STABILITY['residual_gamma'])
                n += 1
            elif isinstance(m, Bottleneck):
                m.norm3.weight.mul_(STABILITY['residual_gamma'])
                n += 1
    log['stabilize'] = dict(STABILITY, residual_blocks=n)


def floor_running_var(model, log):
    with torch.no_grad():
        for m in model.backbone.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_var.clamp_(min=float(m.running_var.median()) * STABILITY['running_var_floor'])


def calibrate(model, family, images, seed, target, log):
    """Everything of step 2 (see module doc). Returns the number of detections/image at the tuned setting."""
    gen = torch.Generator().manual_seed(seed + 1)
    randomize_norm_affine(model, gen, log)
    stabilize_backbone(model, gen, log)
    pipeline = Compose(get_test_pipeline_cfg(model.cfg))
    prepped = [prepare(model, pipeline, p) for p in images]
    inputs = [p[0] for p in prepped]
    samples = [p[1] for p in prepped]
    metas = [s[0].metainfo for s in samples]

    calibrate_bn(model, inputs, log)
    floor_running_var(model, log)
    with torch.no_grad():
        feats = [model.backbone(x) for x in inputs]
    log['backbone_out_eval'] = feature_stats(feats[0])

    # neck: 1) reduction conv stats (forward stopped right after it), 2) fpn conv stats from one full pass whose
    # outputs are then transformed exactly like the rescaled convs would produce them (the neck is linear there)
    neck = model.neck
    tap = Tap(neck.reduction_conv.conv)

    def stop(m, i, o):
        raise _StopForward
    hstop = neck.reduction_conv.conv.register_forward_hook(stop)
    with torch.no_grad():
        for f in feats:
            try:
                neck(f)
            except _StopForward:
                pass
    hstop.remove()
    tap.remove()
    a = 1.0 / tap.std
    _affine_(neck.reduction_conv.conv, a, -a * tap.mean)
    log['neck:reduction_conv'] = dict(mean_before=tap.mean, std_before=tap.std, scale=a)
    taps = [Tap(c.conv) for c in neck.fpn_convs]
    with torch.no_grad():
        raw = [neck(f) for f in feats]
    ab = []
    for i, (t, c) in enumerate(zip(taps, neck.fpn_convs)):
        t.remove()
        a = 1.0 / t.std
        _affine_(c.conv, a, -a * t.mean)
        ab.append((a, -a * t.mean))
        log[f'neck:fpn_convs.{i}'] = dict(mean_before=t.mean, std_before=t.std, scale=a)
    xs = [tuple(o * a + b for o, (a, b) in zip(r, ab)) for r in raw]
    del raw
    log['neck_out'] = feature_stats(xs[0])

    if family == 'fcos':
        return calibrate_fcos(model, xs, metas, target, log)

    # RPN: calibrated on its first call (first image, stride-4 level: every neck level has unit std)
    rpn = model.rpn_head
    rlog = log.setdefault('rpn_onthefly', {})
    hooks = [OnTheFly('rpn_conv', rpn.rpn_conv, std_plan(1.0), rlog),
             OnTheFly('rpn_cls', rpn.rpn_cls, std_plan(SPREAD['rpn_cls_std']), rlog),
             OnTheFly('rpn_reg', rpn.rpn_reg, std_plan(SPREAD['rpn_reg_std']), rlog)]
    # The on-the-fly plan sees one level of one image; other levels and images can reach logits past ~17, where
    # float32 sigmoid is exactly 1.0 and tied proposals survive NMS by rounding luck. Bound every logit: the
    # peak is taken in the same pass (registered after OnTheFly, this hook sees the calibrated outputs).
    tap_max = []
    hmax = rpn.rpn_cls.register_forward_hook(lambda m, i, o: tap_max.append(float(o.detach().abs().max())))
    with torch.no_grad():
        props = [rpn.predict(x, s, rescale=False) for x, s in zip(xs, samples)]
    for h in hooks:
        h.h.remove()
        assert h.done
    hmax.remove()
    peak = max(tap_max)
    if peak > SPREAD['rpn_cls_absmax']:
        a = SPREAD['rpn_cls_absmax'] / peak
        _affine_(rpn.rpn_cls, a, 0.0)
        with torch.no_grad():
            props = [rpn.predict(x, s, rescale=False) for x, s in zip(xs, samples)]
        rlog['rpn_cls_absmax_rescale'] = dict(peak_before=peak, scale=a, absmax=SPREAD['rpn_cls_absmax'])
    log['rpn_proposals_per_image'] = [len(p[0]) for p in props]

    roi = model.roi_head
    bbox_heads = list(roi.bbox_head) if isinstance(roi.bbox_head, nn.ModuleList) else [roi.bbox_head]
    mask_heads = []
    if getattr(roi, 'with_mask', False):
        mask_heads = list(roi.mask_head) if isinstance(roi.mask_head, nn.ModuleList) else [roi.mask_head]
    hooks = []
    clog = log.setdefault('roi_onthefly', {})
    for s, bh in enumerate(bbox_heads):
        for i, fc in enumerate(bh.shared_fcs):
            hooks.append(OnTheFly(f'bbox_head.{s}.shared_fcs.{i}', fc, std_plan(1.0), clog))
        hooks.append(OnTheFly(f'bbox_head.{s}.fc_cls', bh.fc_cls, cls_plan(SPREAD['fc_cls_std']), clog))
        hooks.append(OnTheFly(f'bbox_head.{s}.fc_reg', bh.fc_reg, std_plan(SPREAD['fc_reg_std']), clog))
    for mh in mask_heads:  # blob-like rather than speckled masks, see smooth_kernels_
        for c in mh.convs:
            smooth_kernels_(c.conv, gen, SPREAD['mask_conv_dc'])
        smooth_kernels_(mh.upsample, gen, SPREAD['mask_upsample_dc'])
    log['mask_kernels_dc'] = dict(convs=SPREAD['mask_conv_dc'], upsample=SPREAD['mask_upsample_dc'])
    for s, mh in enumerate(mask_heads):
        if getattr(mh, 'conv_res', None) is not None:
            hooks.append(OnTheFly(f'mask_head.{s}.conv_res', mh.conv_res.conv, std_plan(1.0), clog))
        for i, c in enumerate(mh.convs):
            hooks.append(OnTheFly(f'mask_head.{s}.convs.{i}', c.conv, std_plan(1.0), clog))
        hooks.append(OnTheFly(f'mask_head.{s}.upsample', mh.upsample, std_plan(1.0), clog))
        hooks.append(OnTheFly(f'mask_head.{s}.conv_logits', mh.conv_logits,
                              channel_centred_plan(SPREAD['mask_logit_std']), clog))
    if getattr(roi, 'with_semantic', False):
        sh = roi.semantic_head
        for i, c in enumerate(sh.lateral_convs):
            hooks.append(OnTheFly(f'semantic_head.lateral_convs.{i}', c.conv, std_plan(1.0), clog))
        for i, c in enumerate(sh.convs):
            hooks.append(OnTheFly(f'semantic_head.convs.{i}', c.conv, std_plan(1.0), clog))
        hooks.append(OnTheFly('semantic_head.conv_embedding', sh.conv_embedding.conv, std_plan(1.0), clog))
        # conv_logits (183 stuff classes) is used by the training loss only

    # One on-the-fly pass over ALL images at once: the images' neck features are zero-padded to a common size
    # and batched, so every RoI-side layer's first call sees the RoIs of every image (the small border effect
    # of the extra padding does not matter for statistics). The authoritative outputs are computed later,
    # image by image, by mmdet's own inference API.
    xb = pad_batch(xs)
    sb = [s[0] for s in samples]
    with torch.no_grad():
        roi.predict(xb, copy.deepcopy([p[0] for p in props]), sb, rescale=True)
    for h in hooks:
        h.h.remove()
        assert h.done, f'{h.name} was not reached during calibration'

    # Background bias: bisect one shift (the same for every cascade stage, so the mean logit moves by it) to
    # hit the detection target. The final head's predict_by_feat inputs are captured once; only the background
    # logit depends on the shift, so each bisection step just re-runs mmdet's own post-processing.
    final_head = bbox_heads[-1]
    captured = []
    orig = final_head.predict_by_feat

    def capture(**kw):
        captured.append(kw)
        return orig(**kw)
    final_head.predict_by_feat = capture
    with torch.no_grad():
        roi.predict(xb, copy.deepcopy([p[0] for p in props]), sb, rescale=True)
    del final_head.predict_by_feat
    nc = final_head.num_classes

    # The final class logits of a cascade are the MEAN of the 3 stages' logits, which is less spread than each
    # stage's: rescale every stage's fc_cls by one common factor so the logits actually used have the target
    # spread (the logits are linear in fc_cls's parameters, so the captured ones scale exactly; ~1 for one stage).
    fg = torch.cat([c[:, :nc] for kw in captured for c in kw['cls_scores']])
    f = SPREAD['fc_cls_std'] / float(fg.std())
    with torch.no_grad():
        for bh in bbox_heads:
            bh.fc_cls.weight.mul_(f)
            bh.fc_cls.bias.mul_(f)
    for kw in captured:
        kw['cls_scores'] = tuple(c * f for c in kw['cls_scores'])
    log['final_logit_rescale'] = f

    # Count detections above max(score_thr, 0.05): with HTC's score_thr 0.001 a count at 0.001 would push all
    # scores down to ~0.001-0.003; this way HTC gets scores like the others and its top-100 is filled from there.
    count_thr = max(float(roi.test_cfg.score_thr), 0.05)

    def counts(delta):
        out = []
        with torch.no_grad():
            for kw in captured:
                kw2 = dict(kw)
                cs = []
                for c in kw['cls_scores']:
                    c = c.clone()
                    c[:, nc] += delta
                    cs.append(c)
                kw2['cls_scores'] = tuple(cs)
                out += [int((r.scores > count_thr).sum()) for r in orig(**kw2)]
        return out

    delta, c = bisect(lambda d: float(np.mean(counts(d))), target, -10.0, 30.0)
    with torch.no_grad():
        for bh in bbox_heads:
            bh.fc_cls.bias[nc] += delta
    log['bg_bias_shift'] = dict(delta=delta, mean_dets_per_image=c, target=target, count_score_thr=count_thr,
                                est_dets_per_image=counts(delta))
    return c


def pad_batch(xs):
    """list (images) of tuples (levels) of [1, C, H, W] -> tuple of [N, C, Hmax, Wmax], zero-padded."""
    out = []
    for lvl in range(len(xs[0])):
        hm = max(x[lvl].shape[-2] for x in xs)
        wm = max(x[lvl].shape[-1] for x in xs)
        out.append(torch.cat([F.pad(x[lvl], (0, wm - x[lvl].shape[-1], 0, hm - x[lvl].shape[-2])) for x in xs]))
    return tuple(out)


def calibrate_fcos(model, xs, metas, target, log):
    head = model.bbox_head
    with torch.no_grad():
        for sc, stride in zip(head.scales, head.strides):
            st = stride[0] if isinstance(stride, (tuple, list)) else stride
            sc.scale.fill_(math.log(4.0 * st))  # distances exp(scale * raw) ~ 4 strides for raw ~ 1
    log['fcos_scales'] = [float(sc.scale) for sc in head.scales]
    flog = log.setdefault('fcos_onthefly', {})
    # calibrated on their first call (first image, stride-8 level); the head outputs of the same pass are kept
    hooks = [OnTheFly('conv_cls', head.conv_cls, std_plan(SPREAD['fcos_cls_std'], -4.0), flog),
             OnTheFly('conv_centerness', head.conv_centerness, std_plan(SPREAD['fcos_ctr_std'], 0.0), flog),
             OnTheFly('conv_reg', head.conv_reg, std_plan(SPREAD['fcos_reg_std'], SPREAD['fcos_reg_mean']), flog)]
    with torch.no_grad():
        outs = [head(x) for x in xs]
    for h in hooks:
        h.h.remove()
        assert h.done

    def counts(delta):
        n = []
        with torch.no_grad():
            for (cls, reg, ctr), meta in zip(outs, metas):
                r = head.predict_by_feat([c + delta for c in cls], reg, ctr, batch_img_metas=[meta],
                                         rescale=True)[0]
                n.append(len(r))
        return n

    # counts(d) with d subtracted from every class logit (non-increasing in d, as bisect expects)
    delta, c = bisect(lambda d: float(np.mean(counts(-d))), target, -10.0, 10.0)
    delta = -delta
    with torch.no_grad():
        head.conv_cls.bias += delta
    log['cls_bias_shift'] = dict(delta=delta, mean_dets_per_image=c, target=target, est_dets_per_image=counts(delta))
    return c


# ---------------------------------------------------------------------------------------- appendix
def parse_appendix(path=APPENDIX):
    """{section title: {key: shape}} (the neck section is split into 'Neck W18' etc.) and the count table."""
    sections, counts, cur = OrderedDict(), {}, None
    with open(path) as f:
        lines = f.read().splitlines()
    for line in lines:
        if line.startswith('## '):
            cur = line[3:]
            sections.setdefault(cur, OrderedDict())
            continue
        m = re.fullmatch(r'# W(\d+)', line)
        if m and cur and cur.startswith('Neck'):
            cur = f'Neck W{m.group(1)}'
            sections[cur] = OrderedDict()
            continue
        if not line or line.startswith('#') or cur is None:
            continue
        if cur.startswith('Parameter counts'):
            p = line.split()
            counts[(p[0], int(p[1]))] = dict(tensors=int(p[3]), params=int(p[5]), backbone_params=int(p[7]),
                                             backbone_tensors=int(p[9]))
            continue
        m = re.fullmatch(r'(\S+) \[(.*)\]', line)
        if m:
            sections[cur][m.group(1)] = [int(v) for v in m.group(2).split(',') if v.strip()]
    return sections, counts


def check_against_appendix(sd, family, width):
    sections, counts = parse_appendix()
    fam = APPENDIX_FAMILY[family]
    got = OrderedDict((k, list(v.shape)) for k, v in sd.items())
    full = sections['1. Full key list: faster_rcnn_hrnetv2p_w32 (1856 entries)']
    report = {}
    if family == 'faster_rcnn' and width == 32:
        assert got == OrderedDict(full) or (set(got) == set(full) and all(got[k] == full[k] for k in full)), \
            f'key/shape mismatch vs appendix: missing {sorted(set(full) - set(got))[:5]} ' \
            f'extra {sorted(set(got) - set(full))[:5]}'
        report['full_list'] = 'identical keys and shapes (1856 entries)'
    # backbone key names are width independent
    bb_names = {k for k in full if k.startswith('backbone.')}
    assert {k for k in got if k.startswith('backbone.')} == bb_names, 'backbone key names differ from appendix'
    neck = sections[f'Neck W{width}']
    assert {k: got[k] for k in got if k.startswith('neck.')} == dict(neck), 'neck keys/shapes differ'
    if fam == 'faster':
        head = {k: v for k, v in full.items() if not k.startswith(('backbone.', 'neck.'))}
    else:
        head = dict(sections[f'Head keys (non-backbone, non-neck) for family={fam} (identical for W18/W32/W40)'])
    got_head = {k: v for k, v in got.items() if not k.startswith(('backbone.', 'neck.'))}
    assert got_head == head, f'head keys/shapes differ: missing {sorted(set(head) - set(got_head))[:5]} ' \
                             f'extra {sorted(set(got_head) - set(head))[:5]}'
    c = counts[(fam, width)]
    n_params = sum(v.numel() for k, v in sd.items()
                   if not k.endswith(('running_mean', 'running_var', 'num_batches_tracked')))
    assert len(sd) == c['tensors'], (len(sd), c)
    assert n_params == c['params'], (n_params, c)
    report.update(entries=len(sd), params=n_params, backbone_names='match', neck='match', head='match')
    return report


# ------------------------------------------------------------------------------------------ outputs
def to_record(res, ori_h, ori_w):
    inst = res.pred_instances
    rec = dict(boxes=inst.bboxes.detach().float().cpu().clone(), labels=inst.labels.detach().long().cpu().clone(),
               scores=inst.scores.detach().float().cpu().clone(), height=int(ori_h), width=int(ori_w))
    if 'masks' in inst:
        rec['masks_rle'] = masks_to_rle(inst.masks.cpu())
    return rec


def score_stats(scores):
    s = torch.sort(scores.double(), descending=True).values
    gaps = (s[:-1] - s[1:]) if len(s) > 1 else s.new_zeros(0)
    return dict(n=len(s), max=float(s[0]) if len(s) else None, median=float(s.median()) if len(s) else None,
                min=float(s[-1]) if len(s) else None,
                min_adjacent_gap=float(gaps.min()) if len(gaps) else None,
                gaps_below_1e3=int((gaps < 1e-3).sum()), gaps_below_1e4=int((gaps < 1e-4).sum()))


def mask_stats(res):
    inst = res.pred_instances
    if 'masks' not in inst or len(inst) == 0:
        return None
    m = inst.masks.float()
    fills = []
    for mk, b in zip(m, inst.bboxes):
        x1, y1, x2, y2 = [int(v) for v in b.round().tolist()]
        area = max((x2 - x1) * (y2 - y1), 1)
        fills.append(float(mk.sum()) / area)
    fills = np.array(fills)
    return dict(empty=int((m.flatten(1).sum(1) == 0).sum()), mean_fill_of_box=float(fills.mean()),
                min_fill=float(fills.min()), max_fill=float(fills.max()))


def install_htc_v2avg_observer(model):
    """Compute mmdet v2.x HTC masks (sigmoid AVERAGED over the 3 mask heads; mmdet 3.3 keeps only the last
    head's) alongside mmdet 3.3's own run, without changing that run: forward hooks record each mask
    head's logits, and a wrapper around mask_head[-1].predict_by_feat returns mmdet's own result unchanged but
    also pastes the 3-head average with the same function and arguments (stored in store['v2'])."""
    from mmdet.models.test_time_augs import merge_aug_masks
    roi = model.roi_head
    store = dict(logits={})

    def rec(i):
        def hook(m, inp, out):
            store['logits'][i] = (out[0] if isinstance(out, (list, tuple)) else out).detach()
        return hook
    handles = [mh.register_forward_hook(rec(i)) for i, mh in enumerate(roi.mask_head)]
    last = roi.mask_head[-1]
    orig = last.predict_by_feat

    def predict_by_feat(**kw):
        kw_v2 = dict(kw, results_list=copy.deepcopy(kw['results_list']))
        out = orig(**kw)
        n = [len(r) for r in kw_v2['results_list']]
        per_stage = [[m.sigmoid() for m in store['logits'][i].split(n, 0)] for i in range(len(roi.mask_head))]
        kw_v2['mask_preds'] = [merge_aug_masks([ps[j] for ps in per_stage], kw_v2['batch_img_metas'][j])
                               for j in range(len(n))]
        store['v2'] = orig(**kw_v2)
        return out
    last.predict_by_feat = predict_by_feat

    def remove():
        for h in handles:
            h.remove()
        del last.predict_by_feat
    store['remove'] = remove
    return store


def torch_resize_probe(model, pipeline, img_path):
    """Re-run the reference with the resize done like a torchvision-style transform (float bilinear,
    align_corners=False, no antialias, on the un-normalised image; normalisation is affine so the order does not
    matter) instead of cv2 INTER_LINEAR on uint8. Same size, same normalisation, same padding."""
    data = pipeline(dict(img_path=img_path, img_id=0))
    h, w = data['data_samples'].metainfo['img_shape']
    bgr = cv2.imread(img_path, cv2.IMREAD_COLOR)
    t = torch.from_numpy(bgr.copy()).permute(2, 0, 1).float()[None]
    data['inputs'] = F.interpolate(t, size=(h, w), mode='bilinear', align_corners=False)[0]
    with torch.no_grad():
        return model.test_step({'inputs': [data['inputs']], 'data_samples': [data['data_samples']]})[0]


def run_one(name, out_root, images, seed, target, probe, calib_images):
    family, width = parse_model_name(name)
    cfg_file = CONFIGS[family][width]
    cfg_path = os.path.join(CONFIG_ROOT, cfg_file)
    final_dir = os.path.join(out_root, name)
    odir = final_dir + '.partial'  # written here, then swapped in, so readers never see a half-updated model
    shutil.rmtree(odir, ignore_errors=True)
    os.makedirs(odir)
    t_start = time.time()
    log, timing = OrderedDict(), OrderedDict()

    t = time.time()
    model, cfg = build_model(cfg_path, seed)
    timing['build_s'] = time.time() - t
    t = time.time()
    calibrate(model, family, calib_images, seed, target, log)
    timing['calibrate_s'] = time.time() - t

    sd = OrderedDict((k, v.detach().clone().contiguous()) for k, v in model.state_dict().items())
    appendix_report = check_against_appendix(sd, family, width)
    classes = tuple(model.dataset_meta['classes'])
    meta = dict(
        mmdet_version=mmdet.__version__, mmcv_version=mmcv.__version__, mmengine_version=mmengine.__version__,
        CLASSES=classes, dataset_meta=dict(classes=classes),
        config=cfg.pretty_text, config_file=f'mmdet/.mim/configs/hrnet/{cfg_file}',
        seed=seed, hrnetdet_parity=dict(
            note='SEEDED RANDOM, CALIBRATED WEIGHTS FOR PARITY TESTING ONLY - NOT TRAINED',
            model=name, generator='tools/parity/make_reference.py'))
    ckpt = os.path.join(odir, 'checkpoint.pth')
    torch.save({'meta': meta, 'state_dict': sd}, ckpt)
    del model

    # the reference run proper: a fresh model loaded from the saved file, mmdet's own inference API
    t = time.time()
    ref_model, _ = build_model(cfg_path, seed + 12345, checkpoint=ckpt)  # different seed: weights must come from file
    timing['reload_s'] = time.time() - t
    loaded = ref_model.state_dict()
    assert all(torch.equal(loaded[k], sd[k]) for k in sd), 'reloaded weights differ from saved ones'
    pipeline = Compose(get_test_pipeline_cfg(ref_model.cfg))

    proposals = {}
    if hasattr(ref_model, 'rpn_head'):
        orig_predict = ref_model.rpn_head.predict

        def predict_and_stash(self, *a, **k):
            r = orig_predict(*a, **k)
            proposals['last'] = torch.cat([r[0].bboxes, r[0].scores[:, None]], 1).detach().clone()
            return r
        ref_model.rpn_head.predict = types.MethodType(predict_and_stash, ref_model.rpn_head)

    htc_store = install_htc_v2avg_observer(ref_model) if family == 'htc' else None
    reference, per_image = OrderedDict(), OrderedDict()
    for path in images:
        fname = os.path.basename(path)
        t = time.time()
        res = inference_detector(ref_model, path)
        dt = time.time() - t
        h, w = res.metainfo['ori_shape']
        rec = to_record(res, h, w)
        if htc_store is not None:
            v2 = htc_store.pop('v2')[0]
            assert torch.equal(v2.labels.cpu(), rec['labels']) and torch.equal(v2.scores.float().cpu(), rec['scores'])
            rec['masks_rle_v2avg'] = masks_to_rle(v2.masks.cpu())
        rec['img_shape'] = list(res.metainfo['img_shape'])          # resized, unpadded (h, w)
        rec['pad_shape'] = list(res.metainfo['pad_shape'])
        rec['scale_factor'] = [float(v) for v in res.metainfo['scale_factor']]  # (w_scale, h_scale)
        if 'last' in proposals:
            rec['rpn_proposals'] = proposals.pop('last')  # x1,y1,x2,y2,score in the RESIZED image frame
        info = dict(n_dets=len(rec['scores']), infer_s=round(dt, 2), img_shape=rec['img_shape'],
                    scale_factor=rec['scale_factor'], scores=score_stats(rec['scores']),
                    labels_distinct=int(len(torch.unique(rec['labels']))))
        ms = mask_stats(res)
        if ms is not None:
            info['masks'] = ms
        if htc_store is not None:
            info['masks_v2avg'] = mask_stats(types.SimpleNamespace(pred_instances=v2))
        reference[fname] = rec
        per_image[fname] = info
        print(f'  {name} {fname}: {info["n_dets"]} dets, {dt:.1f}s', flush=True)

    htc_v2 = None
    if family == 'htc':
        htc_v2 = ('masks_rle = mmdet 3.3 output (last mask head only); masks_rle_v2avg = mmdet v2.x behaviour '
                  '(sigmoid averaged over the 3 mask heads, how the published metrics were produced), computed '
                  'in the same run from the recorded logits of the 3 heads (install_htc_v2avg_observer); boxes, '
                  'scores and labels are shared.')

    if htc_store is not None:
        htc_store['remove']()
    if probe:
        for path in images:
            fname = os.path.basename(path)
            if probe != ['all'] and fname not in probe:
                continue
            res = torch_resize_probe(ref_model, pipeline, path)
            h, w = res.metainfo['ori_shape']
            prec = to_record(res, h, w)
            st = match_detections(reference[fname], prec, label_offset=0, use_masks='masks_rle' in prec)
            st['unmatched_ref'] = st['unmatched_ref'][:10]
            per_image[fname]['resize_probe'] = st

    torch.save(reference, os.path.join(odir, 'reference.pt'))
    timing['total_s'] = time.time() - t_start
    score_thr = ref_model.cfg.model.test_cfg.get('rcnn', ref_model.cfg.model.test_cfg).get('score_thr')
    info = OrderedDict(
        model=name, family=family, width=width,
        reference=dict(mmdet=mmdet.__version__, mmcv_lite=mmcv.__version__, mmengine=mmengine.__version__,
                       torch=torch.__version__, torchvision=__import__('torchvision').__version__,
                       numpy=np.__version__, opencv=cv2.__version__, python=platform.python_version(),
                       mmcv_ops='tools/parity/mmcv_ops_standin.py (torchvision nms/roi_align)',
                       post_processing='mmdet 3.3 (v3) code paths, run via mmdet.apis.inference_detector'),
        config=f'mmdet/.mim/configs/hrnet/{cfg_file}', seed=seed, score_thr=score_thr,
        max_per_img=100, target_dets_per_image=target,
        images=[os.path.basename(p) for p in images], calibration_images=[os.path.basename(p) for p in calib_images],
        dets_per_image={k: v['n_dets'] for k, v in per_image.items()},
        appendix_check=appendix_report, timing_s={k: round(v, 1) for k, v in timing.items()},
        per_image=per_image, calibration=log,
        reference_pt_layout=('{image_file: {boxes [N,4] float32 xyxy original image, labels [N] int64 mmdet 0-based '
                             '(hrnetdet label = +1), scores [N] float32, height, width, img_shape, pad_shape, '
                             'scale_factor (w,h), rpn_proposals [K,5] (two-stage only, resized-image frame), '
                             'masks_rle (mask models; COCO RLE, str counts)' +
                             (', masks_rle_v2avg (HTC)' if family == 'htc' else '') + '}}'),
    )
    if htc_v2:
        info['htc_masks'] = htc_v2
    if probe:
        info['resize_probe_note'] = ('per_image.*.resize_probe: the same reference model and checkpoint, input '
                                     'resized with torch bilinear on float instead of cv2 on uint8, matched '
                                     'against the reference with compare.py criteria; shows how much of the '
                                     'tolerance an implementation with a torch-side resize would use up.')
    with open(os.path.join(odir, 'info.json'), 'w') as f:
        json.dump(info, f, indent=1, default=str)
    if os.path.exists(final_dir):
        os.rename(final_dir, final_dir + '.old')
    os.rename(odir, final_dir)
    shutil.rmtree(final_dir + '.old', ignore_errors=True)
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description='mmdetection reference outputs for the hrnetdet parity harness')
    ap.add_argument('--models', nargs='+', required=True, help="model names or 'all'")
    ap.add_argument('--out', default='/work/parity_artifacts')
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--target-dets', type=float, default=80.0, help='mean detections per image to aim for')
    ap.add_argument('--probe-images', nargs='*', default=['chelsea.png', 'hubble_deep_field.png'],
                    help="images for the torch-resize sensitivity probe ('all', or none to skip it)")
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--skip-existing', action='store_true', help='skip models whose info.json exists')
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = ALL_MODELS if args.models == ['all'] else args.models
    for n in names:
        parse_model_name(n)
    images = make_images(os.path.join(args.out, 'images'))
    failed = []
    for name in names:
        if args.skip_existing and os.path.exists(os.path.join(args.out, name, 'info.json')):
            print(f'{name}: exists, skipped', flush=True)
            continue
        print(f'{name}: start', flush=True)
        try:
            info = run_one(name, args.out, images, args.seed, args.target_dets, args.probe_images, images)
            probe = ' resize-probe matched%: ' + ', '.join(
                f"{k}={100 * v['resize_probe']['matched_frac']:.0f}" for k, v in info['per_image'].items()
                if 'resize_probe' in v)
            print(f"{name}: done in {info['timing_s']['total_s']}s; dets/image {list(info['dets_per_image'].values())}"
                  f"{probe}", flush=True)
        except Exception:
            traceback.print_exc()
            failed.append(name)
    if failed:
        print('FAILED:', ' '.join(failed))
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
