#!/usr/bin/env python
"""hrnetdet side of the parity harness: compare hrnetdet detections with the stored mmdetection ones.

Run in the project venv (/work/venv):

    python tools/parity/compare.py --artifacts /work/parity_artifacts [--models faster_rcnn_hrnetv2p_w18 ...]

For every ``<artifacts>/<model>/`` that has ``checkpoint.pth`` and ``reference.pt`` (written by
``make_reference.py``), builds ``hrnetdet.create_model(model, checkpoint_path=<checkpoint.pth>)``, runs it in
eval mode on ``<artifacts>/images/*.png`` (one image per call, a CHW float RGB tensor in [0, 1]) and
matches its detections against the reference's top-100:

  * greedy, one to one, reference detections taken by descending score; a reference detection's
    candidates are the unmatched hrnetdet detections with label == mmdet label + 1, box IoU >= --iou,
    |score difference| <= --score-tol and (mask models) mask IoU >= --mask-iou; the candidate with the
    highest box IoU is taken;
  * a model passes on an image when >= --min-matched (98 %) of the reference's detections are matched;
    the model passes when it passes on every image.

Prints a table per model and image and writes a JSON summary (--json). Exit status 1 if any compared
model fails, 0 otherwise (models hrnetdet.list_models() does not list are skipped and reported).

The matching helpers (``match_detections`` etc.) import neither hrnetdet nor mmdet, so
``make_reference.py`` reuses them for its resize-sensitivity probe.
"""
import argparse
import importlib.util
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional

import numpy as np
import torch

# The parity thresholds are hrnetdet's (hrnetdet/inference/match.py), read from that file so that
# make_reference.py, which runs in the reference's venv without hrnetdet, shares them.
_spec = importlib.util.spec_from_file_location(
    "hrnetdet_parity_thresholds", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                               "hrnetdet", "inference", "match.py"))
_match = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_match)
DEFAULTS = dict(iou=_match.BOX_IOU, score_tol=_match.SCORE_TOL, mask_iou=_match.MASK_IOU,
                min_matched=_match.MIN_MATCHED, top_k=100)
# Builder options that make hrnetdet follow mmdet 3.3 where 3.3 departs from the rule the published
# numbers were made with: FCOS's test-time top-k/threshold order (hrnetdet defaults to v2.7's;
# docs/NUMERICS.md, 'FCOS test-time order').
REFERENCE_VERSION_KWARGS = {'fcos_': dict(postprocess='v3')}


# ------------------------------------------------------------------------------------------- helpers
def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU matrix of xyxy boxes (no +1), float64."""
    a = a.double().reshape(-1, 4)
    b = b.double().reshape(-1, 4)
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(union))


def masks_to_rle(masks) -> List[dict]:
    """Binary masks (N x H x W or N x 1 x H x W, bool/uint8/float >= 0.5) -> COCO RLEs with str counts."""
    from pycocotools import mask as mask_util
    if isinstance(masks, torch.Tensor):
        masks = masks.detach().cpu()
        if masks.dim() == 4:
            masks = masks[:, 0]
        masks = (masks >= 0.5) if masks.is_floating_point() else masks.bool()
        masks = masks.numpy()
    masks = np.asarray(masks).astype(np.uint8)
    if masks.shape[0] == 0:
        return []
    rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0)))
    for r in rles:
        if isinstance(r['counts'], bytes):
            r['counts'] = r['counts'].decode('ascii')
    return list(rles)


def mask_iou_matrix(rles_a: List[dict], rles_b: List[dict]) -> np.ndarray:
    from pycocotools import mask as mask_util
    if len(rles_a) == 0 or len(rles_b) == 0:
        return np.zeros((len(rles_a), len(rles_b)))
    enc = lambda rs: [dict(size=list(r['size']), counts=r['counts'].encode('ascii')
                           if isinstance(r['counts'], str) else r['counts']) for r in rs]
    a, b = enc(rles_a), enc(rles_b)
    iou = np.asarray(mask_util.iou(a, b, [0] * len(rles_b)), dtype=np.float64).reshape(len(rles_a), len(rles_b))
    # pycocotools gives two empty masks IoU 0; they agree exactly.
    empty_a, empty_b = np.asarray(mask_util.area(a)) == 0, np.asarray(mask_util.area(b)) == 0
    iou[empty_a[:, None] & empty_b[None, :]] = 1.0
    return iou


def match_detections(ref: Dict, det: Dict, label_offset: int = 1, iou: float = DEFAULTS['iou'],
                     score_tol: float = DEFAULTS['score_tol'], mask_iou: float = DEFAULTS['mask_iou'],
                     top_k: int = DEFAULTS['top_k'], use_masks: bool = False,
                     ref_mask_key: str = 'masks_rle') -> Dict:
    """Greedy one-to-one matching of reference detections (descending score) to ``det``.

    ``ref``: {"boxes", "labels" (mmdet 0-based), "scores"[, masks_rle]}; ``det``: {"boxes", "labels"
    (ref label + label_offset), "scores"[, "masks_rle"]}. Returns per-image statistics.
    """
    rb, rl, rs = ref['boxes'].double(), ref['labels'].long(), ref['scores'].double()
    order = torch.argsort(rs, descending=True, stable=True)[:top_k]
    rb, rl, rs = rb[order], rl[order], rs[order]
    db, dl, ds = det['boxes'].double().reshape(-1, 4), det['labels'].long(), det['scores'].double()
    n_ref, n_det = len(rs), len(ds)
    ious = box_iou(rb, db) if n_ref and n_det else torch.zeros(n_ref, n_det, dtype=torch.float64)
    same = (rl[:, None] + label_offset) == dl[None, :]
    sdiff = (rs[:, None] - ds[None, :]).abs()
    miou = None
    if use_masks:
        ref_rles = [ref[ref_mask_key][i] for i in order.tolist()]
        miou = torch.from_numpy(mask_iou_matrix(ref_rles, det.get('masks_rle', [])))
    eligible = same & (ious >= iou) & (sdiff <= score_tol)
    if miou is not None and n_ref and n_det:
        eligible &= miou >= mask_iou
    used = torch.zeros(n_det, dtype=torch.bool)
    matches = []  # (ref index in sorted order, det index)
    for i in range(n_ref):
        cand = eligible[i] & ~used
        if cand.any():
            j = int(torch.where(cand, ious[i], torch.full_like(ious[i], -1.0)).argmax())
            used[j] = True
            matches.append((i, j))
    # diagnostics for the unmatched: best same-class box IoU regardless of score
    unmatched = sorted(set(range(n_ref)) - {i for i, _ in matches})
    best_iou_unmatched = [float((ious[i] * same[i]).max()) if n_det else 0.0 for i in unmatched]
    stats = dict(n_ref=n_ref, n_det=n_det, n_matched=len(matches),
                 matched_frac=(len(matches) / n_ref) if n_ref else 1.0)
    if matches:
        mi = torch.tensor([m[0] for m in matches])
        mj = torch.tensor([m[1] for m in matches])
        stats.update(mean_score_diff=float(sdiff[mi, mj].mean()), max_score_diff=float(sdiff[mi, mj].max()),
                     min_box_iou=float(ious[mi, mj].min()), mean_box_iou=float(ious[mi, mj].mean()))
        if miou is not None:
            stats.update(min_mask_iou=float(miou[mi, mj].min()), mean_mask_iou=float(miou[mi, mj].mean()))
    stats['unmatched_ref'] = [dict(rank=i, label=int(rl[i]), score=float(rs[i]), best_same_class_iou=b)
                              for i, b in zip(unmatched, best_iou_unmatched)][:20]
    return stats


def record_parity(models: Dict[str, Dict], path: str) -> None:
    """Merge the per-model results of a run (``summary['models']``) into ``path``, the figures
    MODEL_ZOO.md shows (hrnetdet/zoo/parity.json): the lowest matched share over the images, and the
    worst box IoU, score difference and mask IoU of matched detections. IoUs are floored to 4 decimals,
    so that a rounded figure never claims more than was measured."""
    floor4 = lambda x: math.floor(x * 1e4) / 1e4
    table = {}
    if os.path.exists(path):
        with open(path) as f:
            table = json.load(f)
    for name, m in models.items():
        if 'images' not in m:
            continue
        ims = [st for st in m['images'].values() if st['n_matched']]
        entry = dict(matched=round(100 * min(st['matched_frac'] for st in m['images'].values()), 1),
                     images=len(m['images']), min_box_iou=floor4(min(st['min_box_iou'] for st in ims)),
                     max_score_diff=float(f"{max(st['max_score_diff'] for st in ims):.1e}"))
        if any('min_mask_iou' in st for st in ims):
            entry['min_mask_iou'] = floor4(min(st['min_mask_iou'] for st in ims if 'min_mask_iou' in st))
        table[name] = entry
    with open(path, 'w') as f:
        json.dump(table, f, indent=1)
        f.write('\n')


def read_image_chw01(path: str) -> torch.Tensor:
    """PNG -> CHW float32 RGB in [0, 1] (exact pixels, no colour management)."""
    from PIL import Image
    img = np.asarray(Image.open(path).convert('RGB'))
    return torch.from_numpy(img.copy()).permute(2, 0, 1).float().div_(255.0)


def build_hrnetdet(name: str, checkpoint: str):
    """hrnetdet's model for a harness model name, loaded from the reference's checkpoint, with the
    builder options of the reference's code line (``REFERENCE_VERSION_KWARGS``)."""
    import hrnetdet
    kwargs = {k: v for prefix, kw in REFERENCE_VERSION_KWARGS.items() if name.startswith(prefix) for k, v in kw.items()}
    return hrnetdet.create_model(name, checkpoint_path=checkpoint, **kwargs)


def match_to_reference(name: str, ref: Dict, out: Dict, htc_masks: str = 'v2avg', **criteria) -> Dict:
    """``match_detections`` of one image's hrnetdet output against the reference's, masks (as RLE)
    included when the reference has them; HTC against the mean of its mask heads (``htc_masks='v2avg'``)
    when recorded. ``criteria``: match_detections' thresholds."""
    det = {k: v.detach().cpu() for k, v in out.items() if isinstance(v, torch.Tensor)}
    use_masks = 'masks_rle' in ref
    mask_key = 'masks_rle'
    if use_masks and name.startswith('htc_') and htc_masks == 'v2avg' and 'masks_rle_v2avg' in ref:
        mask_key = 'masks_rle_v2avg'
    if use_masks:
        if 'masks' not in det:
            raise RuntimeError(f'{name}: reference has masks but hrnetdet output has none')
        det['masks_rle'] = masks_to_rle(det['masks'])
    st = match_detections(ref, det, label_offset=1, use_masks=use_masks, ref_mask_key=mask_key, **criteria)
    st['mask_key'] = mask_key if use_masks else None
    return st


# ---------------------------------------------------------------------------------------------- main
def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--artifacts', default='/work/parity_artifacts')
    ap.add_argument('--models', nargs='*', default=None, help='default: every model directory present')
    ap.add_argument('--json', default=None, help='summary path (default <artifacts>/compare_summary.json)')
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--record', metavar='PARITY_JSON',
                    help='merge the results into this figures file (hrnetdet/zoo/parity.json), then run '
                         '`python tools/model_zoo.py` to show them in MODEL_ZOO.md')
    ap.add_argument('--iou', type=float, default=DEFAULTS['iou'])
    ap.add_argument('--score-tol', type=float, default=DEFAULTS['score_tol'])
    ap.add_argument('--mask-iou', type=float, default=DEFAULTS['mask_iou'])
    ap.add_argument('--min-matched', type=float, default=DEFAULTS['min_matched'])
    ap.add_argument('--htc-masks', choices=['v2avg', 'v3'], default='v2avg',
                    help="HTC reference masks to compare with: 'v2avg' (mean of the 3 heads, how the "
                         "published metrics were made; stored as masks_rle_v2avg) or 'v3' (mmdet 3.3's own "
                         "output, last head only)")
    args = ap.parse_args(argv)

    import hrnetdet
    known = set(hrnetdet.list_models())
    names = args.models or sorted(d for d in os.listdir(args.artifacts)
                                  if os.path.isfile(os.path.join(args.artifacts, d, 'reference.pt')))
    summary = dict(thresholds=dict(iou=args.iou, score_tol=args.score_tol, mask_iou=args.mask_iou,
                                   min_matched=args.min_matched), models={}, skipped={})
    any_fail = False
    hdr = f"{'model':32s} {'image':24s} {'ref':>4s} {'det':>4s} {'match%':>7s} {'mean|ds|':>9s} " \
          f"{'max|ds|':>8s} {'minIoU':>7s} {'minMaskIoU':>10s}  ok"
    print(hdr)
    print('-' * len(hdr))
    for name in names:
        mdir = os.path.join(args.artifacts, name)
        if name not in known:
            print(f'{name:32s} SKIPPED: hrnetdet.list_models() does not list it')
            summary['skipped'][name] = 'not in hrnetdet.list_models()'
            continue
        if not os.path.isfile(os.path.join(mdir, 'reference.pt')):
            print(f'{name:32s} SKIPPED: no reference.pt in {mdir}')
            summary['skipped'][name] = 'no reference.pt'
            continue
        ref_all = torch.load(os.path.join(mdir, 'reference.pt'), map_location='cpu', weights_only=False)
        t0 = time.time()
        try:
            model = build_hrnetdet(name, os.path.join(mdir, 'checkpoint.pth'))
        except Exception as e:  # a factory that exists but cannot build/load yet
            print(f'{name:32s} FAILED to build/load: {type(e).__name__}: {e}')
            summary['models'][name] = dict(ok=False, error=f'{type(e).__name__}: {e}')
            any_fail = True
            continue
        model.eval().to(args.device)
        mstats, model_ok = {}, True
        for img_file, ref in ref_all.items():
            if not isinstance(ref, dict) or 'boxes' not in ref:
                continue
            img_path = os.path.join(args.artifacts, 'images', img_file)
            img = read_image_chw01(img_path).to(args.device)
            assert tuple(img.shape[1:]) == (ref['height'], ref['width']), (img_file, img.shape)
            with torch.no_grad():
                out = model([img])[0]
            st = match_to_reference(name, ref, out, args.htc_masks, iou=args.iou, score_tol=args.score_tol,
                                    mask_iou=args.mask_iou)
            st['ok'] = st['matched_frac'] >= args.min_matched
            if st['n_ref'] == 0:
                st['warning'] = 'reference has no detections on this image (trivially matched)'
            model_ok &= st['ok']
            mstats[img_file] = st
            fmt = lambda k, f: (f % st[k]) if k in st else '-'
            print(f"{name:32s} {img_file:24s} {st['n_ref']:4d} {st['n_det']:4d} {100 * st['matched_frac']:6.1f}% "
                  f"{fmt('mean_score_diff', '%9.5f'):>9s} {fmt('max_score_diff', '%8.5f'):>8s} "
                  f"{fmt('min_box_iou', '%7.4f'):>7s} {fmt('min_mask_iou', '%10.4f'):>10s}  "
                  f"{'yes' if st['ok'] else 'NO'}")
        summary['models'][name] = dict(ok=model_ok, seconds=round(time.time() - t0, 1), images=mstats)
        any_fail |= not model_ok
        print(f"{name:32s} => {'PASS' if model_ok else 'FAIL'}")
    out_json = args.json or os.path.join(args.artifacts, 'compare_summary.json')
    with open(out_json, 'w') as f:
        json.dump(summary, f, indent=1)
    print(f'summary written to {out_json}')
    if args.record:
        record_parity(summary['models'], args.record)
        print(f'figures recorded in {args.record}')
    if summary['skipped']:
        print('skipped:', ', '.join(summary['skipped']))
    return 1 if any_fail else 0


if __name__ == '__main__':
    sys.exit(main())
