#!/usr/bin/env python
"""Reference side of the training-parity harness: one training step of mmdetection 3.3 itself.

Run with the reference venv (see setup_reference_env.sh):

    /work/parity_env/bin/python tools/parity/train_reference.py --out /work/train_parity_artifacts [--models ...]

For each family at W18 it
  1. builds the detector from mmdet's packaged config and gives it seeded, calibrated random weights with
     make_reference.py's own ``build_model`` and ``calibrate`` (calibrated on the two training images), saves
     ``checkpoint.pth`` in mmdetection's layout and reloads it into a fresh model;
  2. runs one training forward and backward (``model.train()``: the config's norm_eval; HRNet has no frozen
     stages) on two fixed images with fixed ground truth: boxes, labels, bitmap masks and a COCO-stuff-like
     semantic map (HTC). The images are given at the training scale (short side 256, scale factor 1), so no
     resize runs on either side, and go through the config's own data preprocessor (normalise, pad);
  3. records every loss term, the gradient of every parameter and, through a wrapper around each random
     sampler's ``sample``, every sampling decision: the sampled positive and negative indices and the whole
     assignment (``gt_inds``), plus the RPN's inside-anchor flags that define its index space. The hrnetdet
     side (train_compare.py) replays exactly these samples; the sampler's randomness is the only thing
     carried over, everything else (anchors, assignment, targets, losses) is recomputed and compared.
  4. records the config's optimisation recipe (``recipe`` in ``train_info.json``; ``--recipes PATH`` writes
     every family's, for tests/test_train_parity.py).

Output: ``<out>/train_inputs/{a.png, b.png, targets.pt}`` and ``<out>/<model>/{checkpoint.pth,
train_reference.pt, train_info.json}``.
"""
import argparse
import json
import os
import sys
import time
from collections import OrderedDict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import make_reference as mr  # noqa: E402  (imports the mmcv.ops stand-in before mmdet)

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from mmengine import Config  # noqa: E402
from mmengine.structures import InstanceData, PixelData  # noqa: E402
from mmdet.models.dense_heads import anchor_head as mm_anchor_head  # noqa: E402
from mmdet.structures import DetDataSample  # noqa: E402
from mmdet.structures.mask import BitmapMasks  # noqa: E402

FAMILIES = ('faster_rcnn', 'mask_rcnn', 'cascade_rcnn', 'cascade_mask_rcnn', 'htc', 'fcos')
WIDTH = 18
TRAIN_SHORT_SIDE = 256
SEMANTIC_IGNORE = 255

# (image file, skimage.data source, crop rows, crop cols): 256x384 landscape and 320x256 portrait, so the
# batch (320x384 padded) pads each image beyond its own 32-divisible size. (Small: a float64 training
# step of W18 on this batch peaks near 4 GB.)
TRAIN_IMAGES = (
    ('a.png', 'coffee', (40, 296), (60, 444)),
    ('b.png', 'astronaut', (40, 360), (100, 356)),
)
# Per image: (mmdet label, ellipse centre x, y, semi-axes a, b). Sizes from 10 to ~250 px reach every RPN
# and FCOS level; objects cross the image border (allowed_border, clipped masks) and overlap each other.
OBJECTS = (
    ((0, 192, 136, 120, 96), (56, 48, 48, 36, 28), (2, 336, 232, 56, 32), (39, 240, 24, 10, 7),
     (15, 376, 120, 32, 72)),
    ((0, 128, 168, 96, 136), (27, 48, 264, 24, 48), (73, 200, 64, 20, 16), (41, 240, 308, 40, 20)),
)
SCHEDULE_CONFIGS = {'1x': 'faster-rcnn_hrnetv2p-w18-1x_coco.py', '2x': 'faster-rcnn_hrnetv2p-w18-2x_coco.py',
                    '20e': 'cascade-rcnn_hrnetv2p-w18-20e_coco.py'}
# COCO-stuff-like map: stuff classes 80..182 by region, thing pixels their own class, an ignore band.
STUFF = (92, 118, 141, 170)


def make_train_inputs(out_dir):
    """The two training images and their ground truth; written once, checked on later runs."""
    import skimage.data as skd
    os.makedirs(out_dir, exist_ok=True)
    images, targets = [], []
    for (fname, source, (r0, r1), (c0, c1)), objects in zip(TRAIN_IMAGES, OBJECTS):
        rgb = np.ascontiguousarray(getattr(skd, source)()[r0:r1, c0:c1])
        path = os.path.join(out_dir, fname)
        if not os.path.exists(path):
            assert cv2.imwrite(path, rgb[:, :, ::-1].copy())
        assert np.array_equal(cv2.imread(path, cv2.IMREAD_COLOR)[:, :, ::-1], rgb), path
        h, w = rgb.shape[:2]
        yy, xx = np.mgrid[0:h, 0:w] + 0.5
        masks, boxes, labels = [], [], []
        sem = np.zeros((h, w), np.uint8)
        sem[:] = STUFF[0]
        sem[h // 3:, :] = STUFF[1]
        sem[:, : w // 4] = STUFF[2]
        sem[2 * h // 3:, 3 * w // 4:] = STUFF[3]
        sem[h // 2 - 3: h // 2 + 3, :] = SEMANTIC_IGNORE
        for label, cx, cy, a, b in objects:
            m = ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 <= 1.0
            ys, xs = np.nonzero(m)
            masks.append(m.astype(np.uint8))
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            labels.append(label)
            sem[m] = label
        targets.append(dict(boxes=torch.tensor(boxes, dtype=torch.float32), labels=torch.tensor(labels),
                            masks=torch.from_numpy(np.stack(masks)), semantic_seg=torch.from_numpy(sem)))
        images.append(path)
    torch.save(dict(images=[os.path.basename(p) for p in images], targets=targets,
                    layout='per image: boxes [N,4] xyxy float32 pixels, labels [N] mmdet 0-based, masks [N,H,W] '
                           'uint8, semantic_seg [H,W] uint8 (0..182, 255 ignore)'),
               os.path.join(out_dir, 'targets.pt'))
    return images, targets


def data_batch(model, images, targets):
    """mmdet's training batch for the images at scale 1, through the config's own data preprocessor."""
    inputs, samples = [], []
    for i, (path, t) in enumerate(zip(images, targets)):
        bgr = cv2.imread(path, cv2.IMREAD_COLOR)
        h, w = bgr.shape[:2]
        assert min(h, w) == TRAIN_SHORT_SIDE, (path, h, w)
        inputs.append(torch.from_numpy(bgr).permute(2, 0, 1).contiguous())
        s = DetDataSample(metainfo=dict(img_id=i, img_path=path, ori_shape=(h, w), img_shape=(h, w),
                                        scale_factor=(1.0, 1.0), flip=False, flip_direction=None))
        s.gt_instances = InstanceData(bboxes=t['boxes'].clone(), labels=t['labels'].clone(),
                                      masks=BitmapMasks(t['masks'].numpy(), h, w))
        s.ignored_instances = InstanceData(bboxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long))
        s.gt_sem_seg = PixelData(sem_seg=t['semantic_seg'][None].long())
        samples.append(s)
    return model.data_preprocessor({'inputs': inputs, 'data_samples': samples}, training=True)


class SamplingRecorder:
    """Wraps a sampler's ``sample`` to keep, per call (one image), the sampled indices and the assignment;
    and mmdet's ``anchor_inside_flags`` to keep the RPN's index space (the anchors it assigns at all)."""

    def __init__(self, model):
        self.calls = OrderedDict()
        self.inside = []
        self._undo = []
        samplers = []
        if hasattr(model, 'rpn_head'):
            samplers.append(('rpn', model.rpn_head.sampler))
        if hasattr(model, 'roi_head'):
            s = model.roi_head.bbox_sampler
            samplers += [(f'rcnn{i}', x) for i, x in enumerate(s)] if isinstance(s, list) else [('rcnn0', s)]
        for name, sampler in samplers:
            self._wrap(name, sampler)
        orig_inside = mm_anchor_head.anchor_inside_flags

        def inside_flags(*a, **k):
            flags = orig_inside(*a, **k)
            self.inside.append(flags.detach().clone())
            return flags
        mm_anchor_head.anchor_inside_flags = inside_flags
        self._undo.append(lambda: setattr(mm_anchor_head, 'anchor_inside_flags', orig_inside))

    def _wrap(self, name, sampler):
        calls = self.calls.setdefault(name, [])
        orig = sampler.sample

        def sample(assign_result, pred_instances, gt_instances, **kw):
            n_priors = len(pred_instances.priors)
            res = orig(assign_result, pred_instances, gt_instances, **kw)
            calls.append(dict(pos=res.pos_inds.clone(), neg=res.neg_inds.clone(),
                              num_gts_added=len(gt_instances) if sampler.add_gt_as_proposals else 0,
                              num_priors=n_priors,
                              gt_inds=assign_result.gt_inds.clone(), labels=assign_result.labels.clone()))
            return res
        sampler.sample = sample
        self._undo.append(lambda: delattr(sampler, 'sample'))

    def remove(self):
        for undo in self._undo:
            undo()


def recipe_of(cfg):
    """The optimisation recipe of a config, as plain values (the backbone's training mode from the config, or
    the registered backbone class's defaults)."""
    import inspect
    from mmdet.registry import MODELS
    optim = cfg.optim_wrapper
    paramwise = optim.get('paramwise_cfg') or {}
    clip = optim.get('clip_grad')
    warmup, steps = cfg.param_scheduler
    assert warmup['type'] in ('LinearLR', 'ConstantLR') and not warmup['by_epoch'], warmup
    assert steps['type'] == 'MultiStepLR' and steps['by_epoch'], steps
    backbone_defaults = {k: p.default for k, p in
                         inspect.signature(MODELS.get(cfg.model.backbone.type).__init__).parameters.items()}
    backbone = lambda key, absent: cfg.model.backbone.get(key, backbone_defaults.get(key, absent))
    return dict(
        optimizer=optim.optimizer['type'], base_lr=optim.optimizer['lr'], momentum=optim.optimizer['momentum'],
        weight_decay=optim.optimizer['weight_decay'], base_batch_size=cfg.auto_scale_lr['base_batch_size'],
        bias_lr_mult=paramwise.get('bias_lr_mult', 1.0), bias_decay_mult=paramwise.get('bias_decay_mult', 1.0),
        norm_decay_mult=paramwise.get('norm_decay_mult', 1.0), grad_clip=clip['max_norm'] if clip else None,
        grad_clip_norm_type=clip.get('norm_type', 2) if clip else None,
        warmup={'LinearLR': 'linear', 'ConstantLR': 'constant'}[warmup['type']],
        warmup_ratio=warmup.get('start_factor', warmup.get('factor')), warmup_iters=warmup['end'] - warmup['begin'],
        max_epochs=cfg.train_cfg['max_epochs'], milestones=list(steps['milestones']), gamma=steps['gamma'],
        # mmdet's HRNet has norm_eval (default True) and no frozen stages (-1: none frozen)
        norm_eval=bool(backbone('norm_eval', False)), frozen_stages=int(backbone('frozen_stages', -1)))


def write_recipes(path):
    """Every family's W18 config recipe and the schedules, for tests/test_train_parity.py."""
    recipes = {f: dict(recipe_of(Config.fromfile(os.path.join(mr.CONFIG_ROOT, mr.CONFIGS[f][WIDTH]))),
                       config=f'mmdet/.mim/configs/hrnet/{mr.CONFIGS[f][WIDTH]}') for f in FAMILIES}
    recipes['schedules'] = schedules()
    with open(path + '.tmp', 'w') as f:
        json.dump(recipes, f, indent=1, sort_keys=True)
        f.write('\n')
    os.replace(path + '.tmp', path)


def schedules():
    """Each schedule's step-decay epochs and length, from the configs that define it."""
    out = {}
    for tag, cfg_file in SCHEDULE_CONFIGS.items():
        steps = Config.fromfile(os.path.join(mr.CONFIG_ROOT, cfg_file)).param_scheduler[1]
        out[tag] = dict(config=f'mmdet/.mim/configs/hrnet/{cfg_file}', milestones=list(steps['milestones']),
                        max_epochs=steps['end'], gamma=steps['gamma'])
    return out


def bbox2delta_in_input_dtype(proposals, gt, means=(0., 0., 0., 0.), stds=(1., 1., 1., 1.)):
    """mmdet's ``bbox2delta`` (delta_xywh_bbox_coder.py) without its cast to float32."""
    px, py = (proposals[..., 0] + proposals[..., 2]) * 0.5, (proposals[..., 1] + proposals[..., 3]) * 0.5
    pw, ph = proposals[..., 2] - proposals[..., 0], proposals[..., 3] - proposals[..., 1]
    gx, gy = (gt[..., 0] + gt[..., 2]) * 0.5, (gt[..., 1] + gt[..., 3]) * 0.5
    gw, gh = gt[..., 2] - gt[..., 0], gt[..., 3] - gt[..., 1]
    deltas = torch.stack([(gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)], dim=-1)
    return deltas.sub_(deltas.new_tensor(means).unsqueeze(0)).div_(deltas.new_tensor(stds).unsqueeze(0))


def keep_float64(model):
    """mmdet computes three things in float32 whatever the model's dtype: the RPN's training anchors
    (``grid_priors`` without a dtype), the box coder's regression targets (``bbox2delta`` casts) and the data
    preprocessor's normalisation constants (``torch.tensor(mean)`` from the config: 123.675 becomes
    123.67500305). A float64 step with the anchors left in float32 breaks exact IoU ties differently from
    hrnetdet's float64 anchors, and the float32 constants move the normalised input by up to 3.6e-7, which
    the random-weight HRNet amplifies into backbone gradient differences of up to 6.5e-3 (FCOS); this keeps
    all three in float64 (the reference's rules, at the model's precision). Returns the undo."""
    from mmdet.models.task_modules.coders import delta_xywh_bbox_coder as coder
    undo = []
    pre, pre_cfg = model.data_preprocessor, model.cfg.model.data_preprocessor
    constants = dict(mean=pre.mean, std=pre.std)
    for key, value in constants.items():
        setattr(pre, key, torch.tensor(pre_cfg[key], dtype=torch.float64).view(-1, 1, 1))
    undo.append(lambda: [setattr(pre, k, v) for k, v in constants.items()])
    orig_b2d = coder.bbox2delta
    coder.bbox2delta = bbox2delta_in_input_dtype
    undo.append(lambda: setattr(coder, 'bbox2delta', orig_b2d))
    if hasattr(model, 'rpn_head'):
        generator = model.rpn_head.prior_generator
        grid_priors = type(generator).grid_priors
        generator.grid_priors = lambda sizes, **kw: grid_priors(generator, sizes, **dict(kw, dtype=torch.float64))
        undo.append(lambda: delattr(generator, 'grid_priors'))
    return undo


def reference_step(model, images, targets, seed, dtype):
    """One training step with the model and inputs in ``dtype`` (float64: see ``keep_float64``)."""
    model.to(dtype).train()
    torch.manual_seed(seed)
    recorder = SamplingRecorder(model)
    undo = keep_float64(model) if dtype == torch.float64 else []
    try:
        batch = data_batch(model, images, targets)
        for s in batch['data_samples']:
            s.gt_instances.bboxes = s.gt_instances.bboxes.to(dtype)
        losses = model.loss(batch['inputs'].to(dtype), batch['data_samples'])
    finally:
        recorder.remove()
        for u in undo:
            u()
    loss, log_vars = model.parse_losses(losses)
    model.zero_grad()
    loss.backward()
    terms = OrderedDict((k, float(v.detach())) for k, v in log_vars.items() if 'loss' in k and k != 'loss')
    grads = OrderedDict((k, p.grad.detach().clone() if p.grad is not None else None)
                        for k, p in model.named_parameters() if p.requires_grad)
    return dict(losses=terms, total=float(loss), grads=grads, samples=dict(recorder.calls), rpn_inside=recorder.inside,
                batch_input_shape=list(batch['data_samples'][0].batch_input_shape),
                pad_shapes=[list(s.pad_shape) for s in batch['data_samples']])


def write_checkpoint(family, cfg_path, cfg_file, ckpt, images, seed):
    """make_reference.py's seeded, calibrated weights (calibrated on ``images``), in mmdetection's layout."""
    model, _ = mr.build_model(cfg_path, seed)
    mr.calibrate(model, family, images, seed, 80.0, OrderedDict())
    sd = OrderedDict((k, v.detach().clone().contiguous()) for k, v in model.state_dict().items())
    mr.check_against_appendix(sd, family, WIDTH)
    meta = dict(mmdet_version=mr.mmdet.__version__, config_file=f'mmdet/.mim/configs/hrnet/{cfg_file}', seed=seed,
                CLASSES=tuple(model.dataset_meta['classes']),
                hrnetdet_parity=dict(note='SEEDED RANDOM, CALIBRATED WEIGHTS FOR PARITY TESTING ONLY - NOT TRAINED',
                                     model=os.path.basename(os.path.dirname(ckpt)),
                                     generator='tools/parity/train_reference.py'))
    torch.save({'meta': meta, 'state_dict': sd}, ckpt + '.tmp')
    os.replace(ckpt + '.tmp', ckpt)


def run_family(family, out_root, images, targets, seed, reuse_checkpoint=False):
    name = f'{family}_hrnetv2p_w{WIDTH}'
    cfg_file = mr.CONFIGS[family][WIDTH]
    cfg_path = os.path.join(mr.CONFIG_ROOT, cfg_file)
    odir = os.path.join(out_root, name)
    os.makedirs(odir, exist_ok=True)
    ckpt = os.path.join(odir, 'checkpoint.pth')
    t0 = time.time()
    if not (reuse_checkpoint and os.path.exists(ckpt)):
        write_checkpoint(family, cfg_path, cfg_file, ckpt, images, seed)
    t_build = time.time() - t0

    ref, cfg = mr.build_model(cfg_path, seed + 12345, checkpoint=ckpt)  # weights must come from the file
    t1 = time.time()
    step = reference_step(ref, images, targets, seed, torch.float32)
    step['float64'] = reference_step(ref, images, targets, seed, torch.float64)
    t_step = time.time() - t1
    torch.save(step, os.path.join(odir, 'train_reference.pt.tmp'))
    os.replace(os.path.join(odir, 'train_reference.pt.tmp'), os.path.join(odir, 'train_reference.pt'))
    info = OrderedDict(model=name, family=family, config=f'mmdet/.mim/configs/hrnet/{cfg_file}', seed=seed,
                       mmdet=mr.mmdet.__version__, torch=torch.__version__, losses=step['losses'],
                       losses_float64=step['float64']['losses'],
                       total_loss=step['total'], recipe=recipe_of(cfg),
                       sampler_calls={k: len(v) for k, v in step['samples'].items()},
                       sampled={k: [[len(c['pos']), len(c['neg'])] for c in v] for k, v in step['samples'].items()},
                       batch_input_shape=step['batch_input_shape'], pad_shapes=step['pad_shapes'],
                       timing_s=dict(build_calibrate=round(t_build, 1), step=round(t_step, 1)))
    with open(os.path.join(odir, 'train_info.json'), 'w') as f:
        json.dump(info, f, indent=1)
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description='mmdetection training-step reference for hrnetdet')
    ap.add_argument('--out', default='/work/train_parity_artifacts')
    ap.add_argument('--models', nargs='+', default=list(FAMILIES), help='families (faster_rcnn, ..., fcos)')
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--reuse-checkpoints', action='store_true', help='keep an existing checkpoint.pth')
    ap.add_argument('--recipes', help="only write every family's config recipe to this JSON "
                                      "(tests/data/reference_recipes.json) and exit")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.recipes:
        write_recipes(args.recipes)
        return 0
    images, targets = make_train_inputs(os.path.join(args.out, 'train_inputs'))
    for family in args.models:
        if family not in FAMILIES:
            raise SystemExit(f'unknown family {family!r}; known: {", ".join(FAMILIES)}')
        info = run_family(family, args.out, images, targets, args.seed, args.reuse_checkpoints)
        print(f"{info['model']}: {info['timing_s']} losses " +
              ', '.join(f'{k}={v:.5f}' for k, v in info['losses'].items()), flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
