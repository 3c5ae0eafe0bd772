#!/usr/bin/env python
"""hrnetdet side of the training-parity harness: one training step against mmdetection's.

Run in the project venv after ``train_reference.py`` (reference venv) wrote the artifacts:

    python tools/parity/train_compare.py --artifacts /work/train_parity_artifacts [--models ...] \
        [--record hrnetdet/zoo/train_parity.json]

For every ``<artifacts>/<model>/`` with ``checkpoint.pth`` and ``train_reference.pt`` it loads the checkpoint
with ``hrnetdet.create_model`` (min_size 256: the images are already at the training scale, so nothing is
resized), puts the model in train mode (the reference's norm_eval, no frozen stages), replaces each random
sampler by a ``ReplaySampler`` that hands back the reference's sampled indices, runs the same two images and
targets, back-propagates the sum of the losses and compares:

  * each loss term (relative difference; passes within 1e-4);
  * every parameter's gradient, ``|g - g_ref| / |g_ref|`` (L2 norms; passes within 1e-3), mapped to
    hrnetdet's names and layout by the checkpoint converter;
  * every assignment: the set of positive, negative and ignored anchors / RoIs (and the positives' classes)
    that hrnetdet's matcher gives must equal the reference's, in the index space the reference samples from.

Exit status 1 if a compared model fails. ``--record`` merges the figures into the package's
``train_parity.json``, which MODEL_ZOO.md shows.
"""
import argparse
import json
import math
import os
import sys
from collections import OrderedDict
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
import hrnetdet  # noqa: E402
from hrnetdet.zoo.convert import convert_reference  # noqa: E402
from hrnetdet.heads.semantic import IGNORE_INDEX  # noqa: E402
from hrnetdet.zoo.registry import get_family  # noqa: E402

LOSS_TOL = 1e-4
GRAD_TOL = 1e-3
TRAIN_SHORT_SIDE = 256
# The reference's loss names -> hrnetdet's (cascade stages: ``s{i}.`` -> ``_s{i}``). FCOS's names gain a
# ``loss_`` prefix on another branch; either spelling is accepted.
LOSS_NAMES = {'loss_rpn_cls': 'loss_objectness', 'loss_rpn_bbox': 'loss_rpn_box_reg', 'loss_cls': 'loss_classifier',
              'loss_bbox': 'loss_box_reg', 'loss_mask': 'loss_mask', 'loss_semantic_seg': 'loss_semantic_seg'}
FCOS_LOSS_NAMES = {'loss_cls': 'loss_classification', 'loss_bbox': 'loss_bbox_regression',
                   'loss_centerness': 'loss_bbox_ctrness'}


def hrnetdet_loss_name(family: str, key: str) -> str:
    if family == 'fcos':
        return FCOS_LOSS_NAMES[key]
    stage, _, term = key.rpartition('.')
    return LOSS_NAMES[term] + (f'_s{stage[1:]}' if stage else '')


class ReplaySampler:
    """Stands in for torchvision's ``BalancedPositiveNegativeSampler``: each call (one batch of images, one
    sampling round) returns the reference's sampled positives and negatives for those images, mapped into
    hrnetdet's index space by ``index_map``, and records where hrnetdet's own assignment (``labels``) departs
    from the reference's."""

    def __init__(self, calls: List[dict], index_map, report: List[dict], name: str):
        self.calls = iter(calls)
        self.index_map = index_map      # .to_ours(record, image, n candidates, round), .sampled(...)
        self.report = report
        self.name = name
        self.round = 0

    def __call__(self, labels: List[Tensor]):
        pos_masks, neg_masks = [], []
        for image, lab in enumerate(labels):
            rec = next(self.calls)
            ours = self.index_map.to_ours(rec, image, len(lab), self.round)
            pos, neg = ours[rec['pos']], ours[rec['neg']]
            pos_masks.append(torch.zeros_like(lab, dtype=torch.bool).index_fill_(0, pos, True))
            neg_masks.append(torch.zeros_like(lab, dtype=torch.bool).index_fill_(0, neg, True))
            self.report.append(dict(sampler=self.name, image=image, round=self.round,
                                    **compare_assignment(rec, ours, lab)))
            self.index_map.sampled(rec, ours, image, self.round)
        self.round += 1
        return pos_masks, neg_masks


def compare_assignment(rec: dict, ours: Tensor, labels: Tensor) -> dict:
    """The reference's assignment (gt_inds > 0 positive, 0 negative, -1 ignored; candidates it never
    considers count as ignored) against hrnetdet's labels (> 0 positive, 0 negative, -1 ignored)."""
    ref_state = torch.full((len(labels),), -1, dtype=torch.long)
    ref_state[ours] = rec['gt_inds'].clamp(max=1)
    our_state = labels.long().clamp(max=1)
    differ = torch.nonzero(ref_state != our_state).flatten()
    ref_label = torch.full((len(labels),), -1, dtype=torch.long)
    ref_label[ours] = rec['labels'].long() + 1
    pos = our_state == 1
    wrong_class = int(((ref_label != labels.long()) & pos & (ref_state == 1)).sum())
    return dict(candidates=len(labels), reference_considers=len(ours), positives=int(pos.sum()),
                state_differs=len(differ), wrong_class=wrong_class,
                differing=[(int(i), int(ref_state[i]), int(our_state[i])) for i in differ[:10]],
                sampled_state_differs=int((ref_state[ours[rec['pos']]] != our_state[ours[rec['pos']]]).sum()
                                          + (ref_state[ours[rec['neg']]] != our_state[ours[rec['neg']]]).sum()))


class RPNIndexMap:
    """The reference samples among the anchors it assigns at all (``anchor_inside_flags``): its index k is
    anchor ``nonzero(inside)[k]`` of hrnetdet's (identically ordered) anchor list."""

    def __init__(self, inside: List[Tensor]):
        self.inside = inside

    def to_ours(self, rec, image, n, round):
        flags = self.inside[image]
        if len(flags) != n:
            raise AssertionError(f'image {image}: {len(flags)} reference anchors, {n} hrnetdet anchors')
        return torch.nonzero(flags).flatten()

    def sampled(self, rec, ours, image, round):
        pass


class RoIIndexMap:
    """One R-CNN stage's candidates: the reference puts the ground truths before the proposals, hrnetdet
    (torchvision) after. From the second stage on the proposals are the previous stage's refined samples
    without the ground truths, in the order each side sampled them: the reference's positives then negatives,
    hrnetdet's by index. ``sampled`` (after a box round) works out that order for the next stage (and, in HTC,
    for this stage's mask round, which re-samples the same refined boxes)."""

    def __init__(self, previous: Optional['RoIIndexMap'] = None):
        self.previous = previous        # the stage before, whose box round gives this stage's proposals
        self.next_order: Dict[int, Tensor] = {}   # image -> reference proposal k of the next round -> ours

    def to_ours(self, rec, image, n, round):
        g, p = rec['num_gts_added'], rec['num_priors']
        if p + g != n:
            raise AssertionError(f'image {image}: reference samples from {p} proposals + {g} ground truths, '
                                 f'hrnetdet from {n} candidates')
        source = self if round == 1 else self.previous   # HTC's mask round re-samples this stage's refinement
        order = source.next_order[image] if source is not None else torch.arange(p)
        idx = torch.arange(p + g)
        return torch.where(idx < g, idx + p, order[(idx - g).clamp(min=0)])

    def sampled(self, rec, ours, image, round):
        if round != 0:
            return
        g, p = rec['num_gts_added'], rec['num_priors']
        pos, neg = rec['pos'], rec['neg']
        reference_next = torch.cat([pos[pos >= g], neg[neg >= g]])          # the reference's refined, in order
        ours_sampled = torch.sort(torch.cat([ours[pos], ours[neg]])).values  # hrnetdet's, by index
        ours_next = ours_sampled[ours_sampled < p]                          # ... without the ground truths
        position = torch.full((p + g,), -1, dtype=torch.long)
        position[ours_next] = torch.arange(len(ours_next))
        self.next_order[image] = position[ours[reference_next]]


def install_replay(model, step: dict, report: List[dict]) -> None:
    samples = step['samples']
    if 'rpn' in samples:
        model.rpn.fg_bg_sampler = ReplaySampler(samples['rpn'], RPNIndexMap(step['rpn_inside']), report, 'rpn')
    if 'rcnn0' in samples:
        stages = getattr(model.roi_heads, 'stages', [model.roi_heads])
        previous = None
        for i, stage in enumerate(stages):
            previous = RoIIndexMap(previous)
            stage.fg_bg_sampler = ReplaySampler(samples[f'rcnn{i}'], previous, report, f'rcnn{i}')


def load_inputs(art: str, family: str):
    from torchvision.io import read_image
    data = torch.load(os.path.join(art, 'train_inputs', 'targets.pt'), weights_only=True)
    images = [read_image(os.path.join(art, 'train_inputs', f)) for f in data['images']]  # uint8 RGB
    targets = []
    for t in data['targets']:
        tgt = dict(boxes=t['boxes'].clone(), labels=t['labels'] + 1)
        if family in ('mask_rcnn', 'cascade_mask_rcnn', 'htc'):
            tgt['masks'] = t['masks'].clone()
        if family == 'htc':
            tgt['semantic_seg'] = t['semantic_seg'].clone()
        targets.append(tgt)
    return images, targets


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b) if b != 0 else abs(a - b)


class ReferenceSemanticRule:
    """HTC's semantic loss by mmdetection 3.3's rule while in effect: its ``CrossEntropyLoss``
    (``avg_non_ignore=False``) averages over every pixel of the map, ignored ones included. mmdetection 2.0's
    ``FusedSemanticHead`` (``nn.CrossEntropyLoss(ignore_index=255)``), which trained the published HTC models and
    which hrnetdet follows, averages over the non-ignored pixels only; 3.x moved the head to ``build_loss(loss_seg)``.
    The two differ by the non-ignored share of the map (``share``), so the harness compares every loss and
    gradient under 3.3's rule and converts the semantic term to the 2.0 rule with the share."""

    def __init__(self, model):
        self.head = getattr(getattr(model, 'roi_heads', None), 'semantic_head', None)
        self.share: Optional[float] = None

    def __enter__(self):
        head = self.head
        if head is not None:
            def loss(logits, targets):
                labels = head.labels(logits, targets)
                self.share = float((labels != IGNORE_INDEX).double().mean())
                total = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction='sum')
                return total / labels.numel() * head.loss_weight
            head.loss = loss
        return self

    def __exit__(self, *exc):
        if self.head is not None:
            del self.head.loss


class KeepInputPrecision:
    """hrnetdet's transform hands the backbone float32 images (its input contract: the resize works on the 8-bit
    grid), which in a float64 step moves the normalised input by up to 3.7e-7 and the random-weight backbone's
    gradients by up to 6.5e-3 (FCOS). While in effect the images keep their dtype, as in the reference's float64
    step (whose normalisation constants ``train_reference.keep_float64`` keeps in float64)."""

    def __init__(self, model, dtype):
        self.transform = model.transform if dtype == torch.float64 else None

    def __enter__(self):
        if self.transform is not None:
            check = self.transform.check_images

            def keep_dtype(images):
                check(images)  # the contract's checks only
                return images
            self.transform.check_images = keep_dtype
        return self

    def __exit__(self, *exc):
        if self.transform is not None:
            del self.transform.check_images


def run_step(model, step: dict, images, targets, dtype=torch.float32, input_noise: float = 0.0):
    """One training forward and backward with the reference's samples; (losses, gradients, assignment report,
    HTC's non-ignored semantic share or None). ``input_noise``: the std of seeded Gaussian noise added to the
    [0, 1] images (rounding sensitivity)."""
    model.to(dtype).train()
    report: List[dict] = []
    install_replay(model, step, report)
    model.zero_grad()
    gen = torch.Generator().manual_seed(0)
    with ReferenceSemanticRule(model) as rule, KeepInputPrecision(model, dtype):
        losses = model([im.to(dtype) / 255 + input_noise * torch.randn(im.shape, generator=gen, dtype=dtype)
                        for im in images],
                       [{k: v.to(dtype) if k == 'boxes' else v for k, v in t.items()} for t in targets])
    sum(losses.values()).backward()
    grads = {k: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone()
             for k, p in model.named_parameters() if p.requires_grad}
    return {k: float(v.detach()) for k, v in losses.items()}, grads, report, rule.share


def grad_rel_diffs(grads: Dict[str, Tensor], ref: Dict[str, Tensor]) -> Dict[str, float]:
    """|g - g_ref| / |g_ref| per parameter; where the reference has no (or a zero) gradient, |g|."""
    out = {}
    for k, g in grads.items():
        r = ref.get(k)
        rn = float(r.norm()) if r is not None else 0.0
        out[k] = float((g.double() - r.double()).norm()) / rn if rn > 0 else float(g.norm())
    return out


def compare_precision(model, name: str, step: dict, images, targets, dtype) -> dict:
    """hrnetdet's step in ``dtype`` against the reference's step in the same precision."""
    family_record = get_family(name)[0]
    family = family_record.name
    losses, grads, report, share = run_step(model, step, images, targets, dtype)
    loss_rows = OrderedDict()
    for key, ref in step['losses'].items():
        ours_key = hrnetdet_loss_name(family, key)
        loss_rows[ours_key] = dict(reference_key=key, reference=ref, hrnetdet=losses[ours_key],
                                   rel_diff=rel(losses[ours_key], ref))
    if share is not None:  # both under 3.3's rule above; hrnetdet's own (2.0's) rule divides by the share
        loss_rows['loss_semantic_seg'].update(non_ignored_share=share, rule='mmdetection 3.3 (all pixels)',
                                              reference_at_2_0_rule=loss_rows['loss_semantic_seg']['reference'] / share,
                                              hrnetdet_at_2_0_rule=losses['loss_semantic_seg'] / share)
    ref_grads = convert_reference({k: g for k, g in step['grads'].items() if g is not None}, family_record)
    grad_rows = grad_rel_diffs(grads, ref_grads)
    worst = max(grad_rows, key=grad_rows.get)
    return dict(losses=loss_rows, extra_losses=sorted(set(losses) - set(loss_rows)),
                max_loss_rel_diff=max(r['rel_diff'] for r in loss_rows.values()),
                worst_grad_param=worst, worst_grad_rel_diff=grad_rows[worst], params_compared=len(grad_rows),
                reference_unused_params=sorted(k for k, g in step['grads'].items() if g is None),
                missing_params=sorted(set(ref_grads) - set(grad_rows)),
                assignment_differences=sum(r['state_differs'] + r['wrong_class'] for r in report),
                sampled_assignment_differences=sum(r['sampled_state_differs'] for r in report), assignment=report,
                grads_over_tol=sorted(((v, k) for k, v in grad_rows.items() if v > GRAD_TOL), reverse=True)[:20],
                grads=grads)


def compare_model(art: str, name: str) -> dict:
    """Both sides run in float64 and in float32; float64 decides. With random weights, HRNet amplifies
    rounding: float32 gradients move by up to ~1e-2 under input noise of 1e-7 (about one float32 ulp of a
    [0, 1] pixel), reported as ``float32_rounding``, so a float32 gradient comparison cannot tell a rule
    difference from rounding at the 1e-3 tolerance; in float64 rounding is ~1e-9 smaller."""
    family = name.rsplit('_hrnetv2p_', 1)[0]
    mdir = os.path.join(art, name)
    step = torch.load(os.path.join(mdir, 'train_reference.pt'), weights_only=False)
    model = hrnetdet.create_model(name, checkpoint_path=os.path.join(mdir, 'checkpoint.pth'),
                                  min_size=TRAIN_SHORT_SIDE)
    images, targets = load_inputs(art, family)
    r64 = compare_precision(model, name, step['float64'], images, targets, torch.float64)
    r32 = compare_precision(model, name, step, images, targets, torch.float32)
    del r64['grads']
    grads32 = r32.pop('grads')
    try:
        noisy_losses, noisy_grads, _, _ = run_step(model, step, images, targets, torch.float32, 1e-7)
        noisy = grad_rel_diffs(noisy_grads, grads32)
        worst = max(noisy, key=noisy.get)
        r32['float32_rounding'] = dict(
            input_noise=1e-7, worst_grad_rel_diff=noisy[worst], param=worst,
            at_worst_param=noisy[r32['worst_grad_param']],
            losses={k: rel(noisy_losses[k], v['hrnetdet']) for k, v in r32['losses'].items()})
    except AssertionError as e:  # the noise moved a proposal: the replayed samples no longer apply
        r32['float32_rounding'] = dict(input_noise=1e-7, error=str(e))
    ok = (r64['max_loss_rel_diff'] <= LOSS_TOL and r64['worst_grad_rel_diff'] <= GRAD_TOL
          and not r64['extra_losses'] and not r64['missing_params'] and r64['assignment_differences'] == 0
          and r32['assignment_differences'] == 0)
    return dict(model=name, ok=ok, float64=r64, float32=r32)


def record_train_parity(results: Dict[str, dict], path: str) -> None:
    """Merge a run's figures into ``path`` (hrnetdet/zoo/train_parity.json): per architecture, each loss
    term's relative difference and the worst gradient difference with its parameter, both sides in float64
    (what decides), and the float32 run's with the float32 rounding, rounded up to two significant digits so
    that a rounded figure never claims more than was measured."""
    def up2(x: Optional[float]) -> Optional[float]:
        if not x:
            return x
        e = math.floor(math.log10(x)) - 1
        return float(f'{math.ceil(x / 10 ** e) * 10 ** e:.2g}')
    table = json.load(open(path)) if os.path.exists(path) else {}
    for name, r in results.items():
        r64, r32 = r['float64'], r['float32']
        rounding = r32['float32_rounding']  # absent figures (the noise moved a proposal) are None
        table[name] = dict(
            passed=r['ok'], params=r64['params_compared'],
            assignment_differences=r64['assignment_differences'] + r32['assignment_differences'],
            losses={k: up2(v['rel_diff']) for k, v in r64['losses'].items()},
            worst_grad_rel_diff=up2(r64['worst_grad_rel_diff']), worst_grad_param=r64['worst_grad_param'],
            float32=dict(max_loss_rel_diff=up2(r32['max_loss_rel_diff']),
                         worst_grad_rel_diff=up2(r32['worst_grad_rel_diff']), worst_grad_param=r32['worst_grad_param'],
                         rounding_worst_grad=up2(rounding.get('worst_grad_rel_diff')),
                         rounding_max_loss=up2(max(rounding['losses'].values()) if 'losses' in rounding else None)))
        semantic = r64['losses'].get('loss_semantic_seg', {})
        if 'non_ignored_share' in semantic:
            table[name]['notes'] = [
                f"loss_semantic_seg compared under mmdetection 3.3's rule (mean over every pixel, ignored ones "
                f"included: CrossEntropyLoss, avg_non_ignore=False); hrnetdet trains with mmdetection 2.0's "
                f"FusedSemanticHead rule (nn.CrossEntropyLoss(ignore_index=255): mean over the "
                f"{semantic['non_ignored_share']:.4f} non-ignored share), which trained the published models: "
                f"{semantic['hrnetdet_at_2_0_rule']:.7f} vs the reference's {semantic['reference_at_2_0_rule']:.7f} "
                f"converted to that rule"]
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(dict(sorted(table.items())), f, indent=1)
        f.write('\n')
    os.replace(tmp, path)


def write_rpn_fixture(art: str, path: str) -> None:
    """tests/data's record of the reference's RPN assignment on the harness batch (Faster: every anchor
    inside each image's own padded size; Cascade: allowed_border 0): per image and anchor, 1 positive,
    0 negative, -1 ignored or never assigned. The tests check hrnetdet's assigner against it."""
    import numpy as np
    data = torch.load(os.path.join(art, 'train_inputs', 'targets.pt'), weights_only=True)
    out = dict(image_sizes=np.array([list(t['masks'].shape[1:]) for t in data['targets']]))
    for i, t in enumerate(data['targets']):
        out[f'boxes{i}'] = t['boxes'].numpy()
    for family in ('faster_rcnn', 'cascade_rcnn'):
        step = torch.load(os.path.join(art, f'{family}_hrnetv2p_w18', 'train_reference.pt'), weights_only=False)
        out['batch_shape'] = np.array(step['batch_input_shape'])
        for i, (rec, inside) in enumerate(zip(step['samples']['rpn'], step['rpn_inside'])):
            state = torch.full((len(inside),), -1, dtype=torch.int8)
            state[torch.nonzero(inside).flatten()] = rec['gt_inds'].clamp(max=1).to(torch.int8)
            out[f'{family}_state{i}'] = state.numpy()
    tmp = path + '.tmp.npz'
    np.savez_compressed(tmp, **out)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description='hrnetdet training step vs the mmdetection reference')
    ap.add_argument('--artifacts', default='/work/train_parity_artifacts')
    ap.add_argument('--models', nargs='*', help='default: every model directory with train_reference.pt')
    ap.add_argument('--json', help='full summary (default <artifacts>/train_compare_summary.json)')
    ap.add_argument('--record', help='merge the figures into this train_parity.json')
    ap.add_argument('--rpn-fixture', help="write the reference's RPN assignment (tests/data) here and exit")
    args = ap.parse_args(argv)
    if args.rpn_fixture:
        write_rpn_fixture(args.artifacts, args.rpn_fixture)
        return 0
    names = args.models or sorted(d for d in os.listdir(args.artifacts)
                                  if os.path.exists(os.path.join(args.artifacts, d, 'train_reference.pt')))
    results = OrderedDict()
    for name in names:
        r = compare_model(args.artifacts, name)
        results[name] = r
        print(f"{name}: {'PASS' if r['ok'] else 'FAIL'}", flush=True)
        for prec in ('float64', 'float32'):
            p = r[prec]
            print(f"  {prec}: worst gradient {p['worst_grad_rel_diff']:.2e} ({p['worst_grad_param']}, "
                  f"{p['params_compared']} parameters); assignment differences {p['assignment_differences']} "
                  f"(sampled {p['sampled_assignment_differences']})")
            for k, v in p['losses'].items():
                print(f"    {k:22s} reference {v['reference']:.9f} hrnetdet {v['hrnetdet']:.9f} "
                      f"rel {v['rel_diff']:.1e}")
            for v, k in p['grads_over_tol'][:5]:
                print(f"    gradient over tolerance: {k} {v:.2e}")
            for a in p['assignment']:
                if a['state_differs'] or a['wrong_class']:
                    print(f"    assignment {a['sampler']} image {a['image']}: {a['state_differs']} of "
                          f"{a['candidates']} differ (index, reference, hrnetdet) e.g. {a['differing'][:4]}; "
                          f"wrong class {a['wrong_class']}")
        print(f"  float32 rounding (hrnetdet, input noise 1e-7): {r['float32']['float32_rounding']}")
    with open(args.json or os.path.join(args.artifacts, 'train_compare_summary.json'), 'w') as f:
        json.dump(results, f, indent=1)
    if args.record:
        record_train_parity(results, args.record)
    return 0 if all(r['ok'] for r in results.values()) else 1


if __name__ == '__main__':
    sys.exit(main())
