"""``hrnetdet train`` and ``hrnetdet eval`` (their arguments are in ``hrnetdet/cli.py``)."""
import argparse
import json
import logging
import os

from ..data.coco import categories_of, read_annotations
from ..inference.modes import mode_kwargs
from ..zoo.factory import create_model
from .evaluate import evaluate, format_table
from .train import fit, seed_everything


def run_train(args: argparse.Namespace) -> int:
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


def run_eval(args: argparse.Namespace) -> int:
    import torch
    kwargs = {k: v for k, v in (("min_size", args.min_size), ("max_size", args.max_size)) if v}
    model = create_model(args.model, args.pretrained or "." in args.model, checkpoint_path=args.checkpoint,
                         **kwargs)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    metrics = evaluate(model.to(device), args.ann, args.images, out_dir=args.out, device=device,
                       batch_size=args.batch_size, num_workers=args.workers, **mode_kwargs(args))
    print(format_table(metrics))
    if args.out:
        print(f"wrote {os.path.join(args.out, 'predictions.json')}, metrics.json, confusion_matrix.png/.json "
              f"and pr_curves_*.png/.json")
    return 0
