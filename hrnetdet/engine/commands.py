"""``hrnetdet train`` and ``hrnetdet eval``."""
import argparse
import json
import logging
import os

from ..data.coco import categories_of, read_annotations
from ..zoo.factory import create_model
from .evaluate import evaluate, format_table
from ..data.transforms import AUGMENTATIONS
from .train import SCHEDULES, fit, seed_everything


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="architecture, e.g. faster_rcnn_hrnetv2p_w18")
    p.add_argument("--train-ann", required=True, help="COCO instances json of the training set")
    p.add_argument("--train-images", required=True, help="image folder of the training set")
    p.add_argument("--val-ann", help="COCO instances json of the validation set")
    p.add_argument("--val-images", help="image folder of the validation set")
    p.add_argument("--out", required=True, help="run folder: checkpoints, metrics.jsonl, curves")
    length = p.add_mutually_exclusive_group(required=True)
    length.add_argument("--epochs", type=int)
    length.add_argument("--iters", type=int)
    p.add_argument("--batch-size", type=int, default=2, help="images per process (default 2)")
    p.add_argument("--lr", type=float, help="default: the family's rate x total batch / 16")
    p.add_argument("--schedule", choices=sorted(SCHEDULES), help="default: the family's reference schedule")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available; torchrun: LOCAL_RANK)")
    p.add_argument("--amp", nargs="?", const=True, default=False, choices=[True, "bf16", "fp16"],
                   help="mixed precision on CUDA (bf16 where supported, else fp16)")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/training_state.pt")
    p.add_argument("--pretrained", nargs="?", const=True, default=False, metavar="TAG",
                   help="start from the published COCO weights (or this tag); class layers are re-initialised")
    p.add_argument("--checkpoint", help="start from this .pth/.safetensors checkpoint")
    p.add_argument("--weights-backbone", nargs="?", const=True, default=None, metavar="TIMM_NAME",
                   help="initialise the HRNet from timm's ImageNet weights (without detector weights)")
    p.add_argument("--min-size", type=int, nargs="+", help="shorter side(s); several = multi-scale training")
    p.add_argument("--max-size", type=int, help="longer side cap (default 1333)")
    p.add_argument("--workers", type=int, default=2, help="data loader processes")
    p.add_argument("--seed", type=int, default=0, help="seeds the model's initialisation and the run")
    p.add_argument("--keep-empty", action="store_true", help="keep training images without annotations")
    p.add_argument("--aug", choices=AUGMENTATIONS, default="flip",
                   help="augmentation preset (default flip: the reference's horizontal flip)")
    p.add_argument("--ema", nargs="?", type=float, const=0.9998, default=None, metavar="DECAY",
                   help="validate and save an exponential moving average of the weights (decay 0.9998)")
    p.add_argument("--patience", type=int, metavar="N",
                   help="stop when validation bbox AP has not improved for N validations")
    p.add_argument("--checkpoint-every", type=int, metavar="N",
                   help="iterations between checkpoints and validations (default: about 10 per run)")
    p.add_argument("--log-every", type=int, metavar="N",
                   help="iterations between metrics records (default: about 50 per run, at most 20 apart)")
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="recompute the HRNet body's activations in the backward pass: less memory, more time")


def _train_run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _, categories = categories_of(read_annotations(args.train_ann))
    seed_everything(args.seed)  # before the model is built: identical commands give identical weights
    kwargs = {}
    if args.min_size:
        kwargs["min_size"] = args.min_size[-1]
    if args.max_size:
        kwargs["max_size"] = args.max_size
    model = create_model(args.model, args.pretrained, num_classes=len(categories), categories=categories,
                         checkpoint_path=args.checkpoint, weights_backbone=args.weights_backbone, **kwargs)
    summary = fit(model, args.train_ann, args.train_images, args.val_ann, args.val_images, args.out,
                  epochs=args.epochs, iters=args.iters, batch_size=args.batch_size, lr=args.lr,
                  schedule=args.schedule, amp=args.amp, device=args.device, resume=args.resume, seed=args.seed,
                  multiscale=args.min_size if args.min_size and len(args.min_size) > 1 else None,
                  filter_empty=not args.keep_empty, num_workers=args.workers, aug=args.aug, ema=args.ema,
                  patience=args.patience, checkpoint_every=args.checkpoint_every, log_every=args.log_every,
                  grad_checkpoint=args.grad_checkpoint)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=2))
    return 0


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="architecture, optionally with a weight tag")
    p.add_argument("--checkpoint", help="a .safetensors (e.g. RUN_DIR/best/model.safetensors) or reference .pth")
    p.add_argument("--pretrained", nargs="?", const=True, default=False, metavar="TAG",
                   help="use the published weights (or this tag)")
    p.add_argument("--ann", required=True, help="COCO instances json")
    p.add_argument("--images", required=True, help="image folder")
    p.add_argument("--out", help="folder for predictions.json (COCO results), metrics.json, a confusion matrix "
                                 "and precision-recall curves")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--min-size", type=int, help="shorter side (default 800)")
    p.add_argument("--max-size", type=int, help="longer side cap (default 1333)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--workers", type=int, default=2)


def _eval_run(args: argparse.Namespace) -> int:
    import torch
    if not args.checkpoint and not args.pretrained and "." not in args.model:
        raise SystemExit("hrnetdet eval: give --checkpoint, --pretrained or a MODEL.TAG with published weights")
    kwargs = {k: v for k, v in (("min_size", args.min_size), ("max_size", args.max_size)) if v}
    model = create_model(args.model, args.pretrained or "." in args.model, checkpoint_path=args.checkpoint,
                         **kwargs)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    metrics = evaluate(model.to(device), args.ann, args.images, out_dir=args.out, device=device,
                       batch_size=args.batch_size, num_workers=args.workers)
    print(format_table(metrics))
    if args.out:
        print(f"wrote {os.path.join(args.out, 'predictions.json')}, metrics.json, confusion_matrix.png/.json "
              f"and pr_curves_*.png/.json")
    return 0


COMMANDS = {
    "train": {"help": "train or fine-tune a detector on a COCO-format dataset (torchrun for DDP)",
              "add_arguments": _train_args, "run": _train_run},
    "eval": {"help": "COCO bbox/segm AP of a detector on a COCO-format dataset",
             "add_arguments": _eval_args, "run": _eval_run},
}
