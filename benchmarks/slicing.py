"""Sliced inference and test-time augmentation on generated data, scored with pycocotools.

    python benchmarks/slicing.py --out slicing_out train   # tiles + held-out scenes, fine-tune W18 (~25 min, 1 thread)
    python benchmarks/slicing.py --out slicing_out eval    # plain vs sliced (NMS / greedy merge) vs SAHI vs TTA

The data is generated, nothing is downloaded. Training tiles come from the demo's generator
(``make_shapes_dataset``: coloured circles, squares and triangles on a noisy background) at 128x128
with objects 10-40 px across; the held-out split is whole 3000x2000 scenes drawn the same way with a
few hundred such objects each. A Faster R-CNN HRNetV2p-W18 is trained from scratch on the tiles at
native resolution with the demo's recipe, then each held-out scene is predicted

- plain: the whole scene resized to the reference's test scale (short side 800, long side <= 1333),
  as a model would run it out of the box;
- sliced: tiles at native resolution plus the full-image pass, merged by NMS or by greedy
  non-maximum merging;
- TTA: the plain pass with flips and scales;
- SAHI (``sahi.predict.get_sliced_prediction`` through ``hrnetdet.integrations.sahi``): the same
  model on the same tiles (SAHI's windows are hrnetdet's), one tile per call, merged by NMS at IoU
  0.5, by SAHI's default greedy merge (GREEDYNMM, IOS 0.5) or by that merge at IoU 0.5 (as
  hrnetdet's greedy merge matches); compared with the sliced rows without
  the full-image pass (skipped with ``--skip-sahi``).

Peak memory is measured apart, each tool in a fresh process (benchmarks/slicing_memory.py): within
one process the allocator keeps what an earlier row freed, so a later row's RSS peak says little.

TTA is also measured on the demo's own held-out data (``make_shapes_dataset`` with the demo's
settings). Figures go to ``OUT/results.json`` and a markdown table to benchmarks/slicing.md.
"""
import argparse
import contextlib
import io
import json
import os
import sys
import time
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw

from hrnetdet.data import make_shapes_dataset
from hrnetdet.data.results import coco_records
from hrnetdet.data.synthetic import SHAPES, shape_outline

ARCH = "faster_rcnn_hrnetv2p_w18"
TILE = 128                      # training tile side; the model runs tiles at native resolution
MIN_RADIUS, MAX_RADIUS = 5, 20  # objects 10-40 px across
SCENE_SIZE = (3000, 2000)       # (width, height)
SCENE_OBJECTS = 300
MODEL_KWARGS = dict(min_size=TILE, max_size=TILE, norm_eval=False, rpn_pre_nms_top_n_train=200,
                    rpn_post_nms_top_n_train=64, rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=64,
                    box_batch_size_per_image=32, box_detections_per_img=50)
# The demo's own data (hrnetdet/demo.py): for the TTA figure on it.
DEMO_SIZES = ((112, 96), (96, 112), (96, 96))


def _shape_outline(kind: str, cx: float, cy: float, r: float) -> List[Tuple[float, float]]:
    """The shape's polygon; a circle's as 32 points (its segmentation)."""
    if kind != "circle":
        return shape_outline(kind, cx, cy, r)
    angles = np.linspace(0, 2 * np.pi, 32, endpoint=False)
    return [(cx + r * float(np.cos(a)), cy + r * float(np.sin(a))) for a in angles]


def draw_scene(rng: np.random.Generator, width: int, height: int, num_objects: int) -> Tuple[Image.Image, List[dict]]:
    """A large image in the demo generator's style (one base colour plus noise, shapes that do not
    overlap, colours jittered): drawn shape by shape, without a full-size mask per object."""
    base = rng.integers(60, 200, size=3)
    pixels = np.clip(base + rng.normal(0, 18, size=(height, width, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    pen = ImageDraw.Draw(image)
    kinds = list(SHAPES)
    taken = np.zeros((0, 3))
    objects = []
    for _ in range(num_objects):
        for _attempt in range(20):
            r = float(rng.uniform(MIN_RADIUS, MAX_RADIUS))
            cx, cy = float(rng.uniform(r, width - r)), float(rng.uniform(r, height - r))
            gap = taken[:, 2] + r + 2
            if not np.any((np.abs(taken[:, 0] - cx) <= gap) & (np.abs(taken[:, 1] - cy) <= gap)):
                break
        else:
            continue
        taken = np.vstack([taken, [cx, cy, r]])
        kind = kinds[int(rng.integers(len(kinds)))]
        colour = tuple(int(c) for c in np.clip(np.array(SHAPES[kind][1]) + rng.integers(-25, 26, 3), 0, 255))
        outline = _shape_outline(kind, cx, cy, r)
        if kind == "circle":
            pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        else:
            pen.polygon(outline, fill=colour)
        xs, ys = [p[0] for p in outline], [p[1] for p in outline]
        area = {"circle": np.pi * r * r, "square": 4 * r * r, "triangle": 2 * r * r}[kind]
        objects.append({"kind": kind, "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
                        "area": float(area), "segmentation": [[c for p in outline for c in p]]})
    return image, objects


def make_scenes(root: str, split: str, num: int, seed: int) -> Tuple[str, str]:
    """Write ``root/split/*.png`` (whole scenes) and ``root/split.json``; returns (annotations, folder)."""
    ann_file, image_dir = os.path.join(root, f"{split}.json"), os.path.join(root, split)
    if os.path.isfile(ann_file):
        return ann_file, image_dir
    os.makedirs(image_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for i in range(num):
        img, objects = draw_scene(rng, *SCENE_SIZE, SCENE_OBJECTS)
        file_name = f"{i:05d}.png"
        img.save(os.path.join(image_dir, file_name))
        images.append({"id": i + 1, "file_name": file_name, "width": SCENE_SIZE[0], "height": SCENE_SIZE[1]})
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "iscrowd": 0,
                                "category_id": SHAPES[obj["kind"]][0], "bbox": obj["bbox"],
                                "area": obj["area"], "segmentation": obj["segmentation"]})
    cats = [{"id": cid, "name": name, "supercategory": "shape"} for name, (cid, _) in SHAPES.items()]
    tmp = ann_file + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": cats}, f)
    os.replace(tmp, ann_file)
    return ann_file, image_dir


def make_data(out: str, seed: int) -> Dict[str, Tuple[str, str]]:
    """The three splits, generated once (the generators are seeded, so a rerun would write the same)."""
    data = os.path.join(out, "data")

    def shapes(split: str, num: int, **kwargs) -> Tuple[str, str]:
        ann_file = os.path.join(data, f"{split}.json")
        if os.path.isfile(ann_file):
            return ann_file, os.path.join(data, split)
        return make_shapes_dataset(data, split, num, **kwargs)

    return {
        "train_tiles": shapes("train_tiles", 480, seed=seed, sizes=((TILE, TILE),), max_objects=8,
                              min_radius=MIN_RADIUS, max_radius=MAX_RADIUS),
        "scenes": make_scenes(data, "scenes", 3, seed=seed + 2),
        # The demo's held-out split (hrnetdet/demo.py: seed + 1, its sizes and radii).
        "demo_val": shapes("demo_val", 48, seed=1, sizes=DEMO_SIZES, min_radius=10, max_radius=22),
    }


def train(args) -> None:
    from hrnetdet.data import CocoDetection
    from hrnetdet.engine.train import fit
    from hrnetdet.zoo import create_model

    data = make_data(args.out, args.seed)
    categories = CocoDetection(*data["train_tiles"]).categories
    torch.manual_seed(args.seed)
    model = create_model(ARCH, num_classes=len(categories), categories=categories, **MODEL_KWARGS)
    start = time.time()
    summary = fit(model, *data["train_tiles"], out_dir=os.path.join(args.out, "run"), iters=args.iters,
                  batch_size=2, lr=0.01, seed=args.seed, checkpoint_every=max(1, args.iters // 8),
                  log_every=20, resume=True)
    with open(os.path.join(args.out, "train.json"), "w") as f:
        json.dump({"iterations": summary["iterations"], "seconds": round(time.time() - start, 1),
                   "threads": torch.get_num_threads(), "last": summary["last"]}, f, indent=2)


def load_model(out: str) -> torch.nn.Module:
    from hrnetdet.zoo import create_model

    path = os.path.join(out, "run", "last", "model.safetensors")
    with open(os.path.join(out, "run", "last", "config.json")) as f:
        config = json.load(f)
    model = create_model(ARCH, checkpoint_path=path, num_classes=len(config["categories"]),
                         categories=config["categories"], **MODEL_KWARGS).eval()
    model.iterations = config["iteration"]
    return model


@contextlib.contextmanager
def capacity(model: torch.nn.Module, proposals: int, detections: int):
    """Temporarily raise the RPN's test-time proposal counts and the detections per image."""
    rpn, heads = model.rpn, model.roi_heads
    saved = dict(rpn._pre_nms_top_n), dict(rpn._post_nms_top_n), heads.detections_per_img
    rpn._pre_nms_top_n["testing"] = rpn._post_nms_top_n["testing"] = proposals
    heads.detections_per_img = detections
    try:
        yield
    finally:
        rpn._pre_nms_top_n, rpn._post_nms_top_n, heads.detections_per_img = saved


def coco_eval(ann_file: str, results: List[dict], max_dets: int) -> Dict[str, float]:
    """The COCO bbox AP numbers with up to ``max_dets`` detections per image (scenes hold hundreds;
    read from the precision table, since ``summarize`` prints its first AP at 100 detections)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    names = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    if not results:
        return {n: 0.0 for n in names}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(ann_file)
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.params.maxDets = [1, 10, max_dets]
        ev.evaluate()
        ev.accumulate()
    precision = ev.eval["precision"][..., -1]  # (IoU, recall, class, area) at max_dets

    def mean(p: np.ndarray) -> float:
        p = p[p > -1]
        return round(float(p.mean()), 4) if p.size else -1.0

    return {"AP": mean(precision[..., 0]), "AP50": mean(precision[0, ..., 0]), "AP75": mean(precision[5, ..., 0]),
            "APs": mean(precision[..., 1]), "APm": mean(precision[..., 2]), "APl": mean(precision[..., 3])}


def run_mode(name: str, images: Sequence[Tuple[int, torch.Tensor]], predict
             ) -> Tuple[Dict[int, Dict[str, torch.Tensor]], float]:
    """Each image's result and the seconds per image of one way of predicting."""
    preds, start = {}, time.perf_counter()
    for image_id, image in images:
        preds[image_id] = predict(image)
    seconds = (time.perf_counter() - start) / len(images)
    print(f"  {name}: {sum(len(p['scores']) for p in preds.values())} detections, {seconds:.1f} s/image", flush=True)
    return preds, seconds


def score(preds: Dict[int, Dict[str, torch.Tensor]], cat_ids: Sequence[int], ann_file: str, max_dets: int,
          seconds: float) -> Dict[str, float]:
    results = [r for image_id, p in preds.items() for r in coco_records(p, image_id, cat_ids)]
    row = dict(coco_eval(ann_file, results, max_dets), seconds_per_image=round(seconds, 3))
    print(f"    {row}", flush=True)
    return row


def sahi_predictions(model: torch.nn.Module, images: Sequence[Tuple[int, torch.Tensor]], size: int, overlap: float,
                     merge: str) -> Tuple[Dict[int, Dict[str, torch.Tensor]], float]:
    """SAHI's sliced prediction of each image without the full-image pass, merged by ``merge``
    ("nms": NMS at IoU 0.5; "greedy": SAHI's default GREEDYNMM at IOS 0.5; "greedy iou": GREEDYNMM at
    IoU 0.5), as hrnetdet results
    (labels are the model's) and the seconds per image."""
    from sahi.predict import get_sliced_prediction

    from hrnetdet.integrations.sahi import detection_model

    helper = detection_model(model, slice_size=size, confidence_threshold=model.settings.score_thresh)
    post = {"nms": ("NMS", "IOU"), "greedy": ("GREEDYNMM", "IOS"), "greedy iou": ("GREEDYNMM", "IOU")}[merge]
    label_of = {cid: label for label, cid in enumerate(model.category_ids) if cid is not None}
    preds, seconds = {}, 0.0
    for image_id, image in images:
        pixels = image.mul(255).round().byte().permute(1, 2, 0).numpy()
        start = time.perf_counter()
        with capacity(model, 200, 100):
            found = get_sliced_prediction(pixels, helper, slice_height=size, slice_width=size,
                                          overlap_height_ratio=overlap, overlap_width_ratio=overlap,
                                          perform_standard_pred=False, postprocess_type=post[0],
                                          postprocess_match_metric=post[1], postprocess_match_threshold=0.5,
                                          force_postprocess_type=True, verbose=0).object_prediction_list
        seconds += time.perf_counter() - start
        preds[image_id] = {"boxes": torch.tensor([p.bbox.to_xyxy() for p in found]).reshape(-1, 4),
                           "scores": torch.tensor([p.score.value for p in found]),
                           "labels": torch.tensor([label_of[p.category.id] for p in found], dtype=torch.int64)}
    print(f"  SAHI {merge}: {sum(len(p['scores']) for p in preds.values())} detections, "
          f"{seconds / len(images):.1f} s/image", flush=True)
    return preds, seconds / len(images)


def _load(ann_file: str, image_dir: str) -> Tuple[List[Tuple[int, torch.Tensor]], List[int]]:
    from hrnetdet.data import CocoDetection

    ds = CocoDetection(ann_file, image_dir, with_masks=False)
    return [(int(t["image_id"]), im) for im, t in (ds[i] for i in range(len(ds)))], ds.cat_ids


@torch.no_grad()
def evaluate_all(args) -> None:
    from hrnetdet.inference.slicing import merge_tiles, predict_tiles, test_scale, tile_windows
    from hrnetdet.inference.tta import tta_predict

    data = make_data(args.out, args.seed)
    model = load_model(args.out)
    rows: Dict[str, Dict[str, float]] = {}
    summary = {"model": ARCH, "iterations": model.iterations, "threads": torch.get_num_threads(),
               "slice": args.slice, "overlap": args.overlap, "tta_scales": list(args.tta_scales),
               "rows": rows}

    def save() -> None:  # after every row, so that a long run shows its figures as they come
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(summary, f, indent=2)
        write_table(summary, os.path.join(os.path.dirname(os.path.abspath(__file__)), "slicing.md"))

    # TTA on the demo's held-out data, at the demo's test scale (about 1: images of ~100 px).
    images, cat_ids = _load(*data["demo_val"])
    print(f"demo held-out data: {len(images)} images")
    if args.keep_demo:
        with open(os.path.join(args.out, "results.json")) as f:
            rows.update({k: v for k, v in json.load(f)["rows"].items() if k.startswith("demo")})
    else:
        with test_scale(model, 96, 120):
            for name, predict in (("demo plain", lambda im: model([im])[0]),
                                  ("demo TTA", lambda im: tta_predict(model, im, scales=args.tta_scales))):
                preds, sec = run_mode(name, images, predict)
                rows[name] = score(preds, cat_ids, data["demo_val"][0], 100, sec)
                save()

    # The large scenes: plain at the reference's test scale, sliced at native resolution.
    images, cat_ids = _load(*data["scenes"])
    images = images[:args.scenes]
    summary["scenes"] = len(images)
    print(f"held-out scenes: {len(images)} images of {SCENE_SIZE[0]}x{SCENE_SIZE[1]}")
    scene_ann, max_dets = data["scenes"][0], 1000

    def plain(image):
        with test_scale(model, 800, 1333), capacity(model, 1000, max_dets):
            return model([image])[0]

    full_pass, plain_seconds = run_mode("scenes plain", images, plain)
    rows["scenes plain"] = score(full_pass, cat_ids, scene_ann, max_dets, plain_seconds)
    save()

    # Tiles are predicted once per scene; the merges reuse them (their own cost is timed apart),
    # and the full-image pass is the plain one.
    tiles, tile_seconds = {}, 0.0
    for image_id, image in images:
        windows = tile_windows(*image.shape[-2:], args.slice, args.overlap)
        start = time.perf_counter()
        with capacity(model, 200, 100):
            tiles[image_id] = (windows, predict_tiles(model, image, windows, batch_size=4))
        tile_seconds += time.perf_counter() - start
    tile_seconds /= len(images)
    print(f"  tiles: {len(windows)} of {args.slice}x{args.slice} per scene, {tile_seconds:.1f} s/image")
    for merge in ("nms", "greedy"):
        for with_full in (True, False):
            name = f"scenes sliced {merge}" + (" + full image" if with_full else "")
            preds, start = {}, time.perf_counter()
            for image_id, image in images:
                windows, outs = tiles[image_id]
                full = full_pass[image_id] if with_full else None
                preds[image_id] = merge_tiles(outs, windows, *image.shape[-2:], full, merge=merge)
            sec = tile_seconds + (time.perf_counter() - start) / len(images) + (plain_seconds if with_full else 0.0)
            rows[name] = score(preds, cat_ids, scene_ann, max_dets, sec)
            save()

    if not args.skip_sahi:
        for merge in ("nms", "greedy", "greedy iou"):
            preds, sec = sahi_predictions(model, images, args.slice, args.overlap, merge)
            rows[f"scenes SAHI {merge}"] = score(preds, cat_ids, scene_ann, max_dets, sec)
            save()

    if not args.skip_scene_tta:
        def tta(image):
            with test_scale(model, 800, 1333), capacity(model, 1000, max_dets):
                return tta_predict(model, image, scales=args.tta_scales)

        preds, sec = run_mode("scenes TTA", images, tta)
        rows["scenes TTA"] = score(preds, cat_ids, scene_ann, max_dets, sec)
        save()


def write_table(summary: dict, path: str) -> None:
    rows = summary["rows"]
    lines = [f"# Sliced inference and TTA ({summary['model']}, {summary['iterations']} iterations on "
             f"generated tiles, {summary['threads']} thread)", "",
             "Written by `python benchmarks/slicing.py --out slicing_out eval` (see its docstring). "
             f"Slices {summary['slice']}x{summary['slice']}, overlap {summary['overlap']}; TTA: horizontal "
             f"flip x scales {summary['tta_scales']} of the test scale. Seconds per image on this "
             "machine's CPU, one thread, measured in one process."
             + (f" Scenes: the first {summary['scenes']}." if summary.get("scenes", 3) < 3 else ""), "",
             "| mode | AP | AP50 | AP75 | AP_small | AP_medium | s/image |", "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['AP']:.3f} | {r['AP50']:.3f} | {r['AP75']:.3f} | {r['APs']:.3f} | "
                     f"{r['APm']:.3f} | {r['seconds_per_image']:.2f} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv: Sequence[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=["train", "eval"])
    parser.add_argument("--out", default="slicing_out")
    parser.add_argument("--iters", type=int, default=800)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slice", type=int, default=256, help="tile side for sliced inference")
    parser.add_argument("--overlap", type=float, default=0.2)
    parser.add_argument("--tta-scales", type=float, nargs="+", default=[0.8, 1.0, 1.2])
    parser.add_argument("--skip-scene-tta", action="store_true", help="TTA on the demo data only")
    parser.add_argument("--skip-sahi", action="store_true", help="without the SAHI rows")
    parser.add_argument("--scenes", type=int, default=3, help="score the first N held-out scenes (a shorter run)")
    parser.add_argument("--keep-demo", action="store_true", help="reuse the demo rows of OUT/results.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.phase == "train":
        train(args)
    else:
        evaluate_all(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
