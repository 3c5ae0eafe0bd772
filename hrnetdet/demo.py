"""The end-to-end demo: make a small synthetic COCO-format dataset (coloured shapes with masks),
fine-tune an HRNetV2p-W18 Faster R-CNN on it on the CPU, evaluate it on held-out images and draw
its predictions and training curves.

    python -m hrnetdet.demo --out demo_out

ImageNet backbone weights are used when they are already in the local cache (``hrnetdet download
--backbone hrnet_w18.ms_in1k`` on a connected machine); otherwise it trains from scratch, and says so.
"""
import argparse
import json
import logging
import os
import sys
import time
from typing import List, Optional

import torch
from PIL import Image

from .data import AUGMENTATIONS, CocoDetection, make_shapes_dataset
from .engine.evaluate import evaluate, format_table
from .engine.train import fit
from .threads import THREADS_HELP, physical_cores, set_num_threads
from .visualize import draw_tiles
from .zoo import create_model

ARCH = "faster_rcnn_hrnetv2p_w18"
# Small images, few proposals and RoIs: the RoI and proposal counts dominate the CPU time.
# BatchNorm trains (norm_eval=False): without ImageNet statistics frozen BN would be the identity.
IMAGE_SIZES = ((112, 96), (96, 112), (96, 96))  # (width, height)
MODEL_KWARGS = dict(min_size=96, max_size=120, norm_eval=False, rpn_pre_nms_top_n_train=200,
                    rpn_post_nms_top_n_train=64, rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=64,
                    box_batch_size_per_image=32, box_detections_per_img=20)


def build_model(categories: List[str], seed: int) -> "tuple[torch.nn.Module, str]":
    """The detector, with cached ImageNet backbone weights when present; returns (model, how)."""
    torch.manual_seed(seed)
    kwargs = dict(num_classes=len(categories), categories=categories, **MODEL_KWARGS)
    try:
        model = create_model(ARCH, weights_backbone=True, local_files_only=True, **kwargs)
        return model, "ImageNet-initialised HRNet-W18 backbone (timm hrnet_w18.ms_in1k, from the local cache)"
    except FileNotFoundError:
        torch.manual_seed(seed)
        return create_model(ARCH, **kwargs), "from scratch (no ImageNet weights in the local cache)"


@torch.no_grad()
def draw_predictions(model: torch.nn.Module, ds: CocoDetection, path: str, num: int = 12,
                     score_thresh: float = 0.5) -> None:
    """A grid of held-out images with the predictions scoring at least ``score_thresh``."""
    model.eval()
    images, preds = [], []
    for i in range(min(num, len(ds))):
        image, _ = ds[i]
        pred = model([image])[0]
        pred["names"] = [ds.categories[label] for label in pred["labels"].tolist()]
        images.append(image)
        preds.append(pred)
    grid = draw_tiles(images, preds, score_thresh=score_thresh)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--out", default="demo_out", help="output folder")
    parser.add_argument("--train-images", type=int, default=240)
    parser.add_argument("--val-images", type=int, default=48)
    parser.add_argument("--iters", type=int, default=800, help="training iterations")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.01, help="0.02 diverges from scratch")
    parser.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--aug", choices=AUGMENTATIONS, default="flip", help="augmentation preset")
    parser.add_argument("--ema", nargs="?", type=float, const=0.9998, default=None, metavar="DECAY",
                        help="validate and keep an exponential moving average of the weights")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start, cpu_start = time.time(), time.process_time()
    load = os.getloadavg()[0]
    threads = set_num_threads(args.threads)
    print(f"CPU: {physical_cores()} physical cores, load average {load:.1f}, using {threads} thread(s)")

    data = os.path.join(args.out, "data")
    shapes = dict(sizes=IMAGE_SIZES, min_radius=10, max_radius=22)
    train_ann, train_dir = make_shapes_dataset(data, "train", args.train_images, seed=args.seed, **shapes)
    val_ann, val_dir = make_shapes_dataset(data, "val", args.val_images, seed=args.seed + 1, **shapes)
    categories = CocoDetection(train_ann, train_dir).categories
    print(f"synthetic dataset: {args.train_images} training and {args.val_images} held-out images of "
          f"{', '.join(categories[1:])} in {data}")

    model, how = build_model(categories, args.seed)
    print(f"model: {ARCH}, {how}")
    run = os.path.join(args.out, "run")
    summary = fit(model, train_ann, train_dir, val_ann, val_dir, out_dir=run, iters=args.iters,
                  batch_size=args.batch_size, lr=args.lr, seed=args.seed, aug=args.aug, ema=args.ema,
                  checkpoint_every=max(1, args.iters // 2), log_every=20)
    train_time = time.time() - start

    if args.ema is not None:  # last/ holds the EMA weights, the ones validated
        model = create_model(ARCH, checkpoint_path=summary["last"], num_classes=len(categories), **MODEL_KWARGS)
    metrics = evaluate(model, val_ann, val_dir, out_dir=os.path.join(args.out, "eval"), progress=False)
    print(format_table(metrics))
    draw_predictions(model, CocoDetection(val_ann, val_dir), os.path.join(args.out, "predictions.png"))
    wall = time.time() - start
    result = {"model": ARCH, "initialisation": how, "iterations": summary["iterations"], "aug": args.aug,
              "ema": args.ema, "torch": torch.__version__,
              "held_out_bbox_AP": metrics["bbox"]["stats"]["AP"], "held_out_bbox_AP50": metrics["bbox"]["stats"]["AP50"],
              "train_seconds": round(train_time, 1), "wall_seconds": round(wall, 1), "threads": threads,
              "cpu_seconds": round(time.process_time() - cpu_start, 1), "load_average_at_start": round(load, 2),
              "load_average_at_end": round(os.getloadavg()[0], 2), "checkpoint": summary["last"]}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"held-out bbox AP {result['held_out_bbox_AP']:.3f} (AP50 {result['held_out_bbox_AP50']:.3f}) after "
          f"{summary['iterations']} iterations; wall time {wall / 60:.1f} min. Pictures: "
          f"{os.path.join(args.out, 'predictions.png')}, curves: {run}/loss.png, lr.png, ap.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
