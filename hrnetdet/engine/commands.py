"""``hrnetdet train`` and ``hrnetdet eval`` (their arguments are in ``hrnetdet/cli.py``)."""
import argparse
import json
import logging
import os

from ..data.coco import categories_of, read_annotations
from ..detectors.settings import given_settings
from ..inference.commands import int8_kwargs
from ..inference.modes import mode_kwargs
from ..zoo.factory import create_model
from .evaluate import evaluate, format_table
from .train import fit, seed_everything


def run_train(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _, categories = categories_of(read_annotations(args.train_ann))
    seed_everything(args.seed)  # before the model is built: identical commands give identical weights
    # several --min-size: multi-scale training (the transform picks one per batch; the last is the test size)
    model = create_model(args.model, args.pretrained, num_classes=len(categories), categories=categories,
                         checkpoint_path=args.checkpoint_path, weights_backbone=args.weights_backbone,
                         **given_settings(args))
    summary = fit(model, args.train_ann, args.train_images, args.val_ann, args.val_images, args.out,
                  epochs=args.epochs, iters=args.iters, batch_size=args.batch_size, lr=args.lr,
                  schedule=args.schedule, amp=args.amp, device=args.device, resume=args.resume, seed=args.seed,
                  filter_empty=not args.keep_empty, num_workers=args.num_workers, aug=args.aug, ema=args.ema,
                  patience=args.patience, checkpoint_every=args.checkpoint_every, log_every=args.log_every,
                  grad_checkpoint=args.grad_checkpoint)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=2))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    import torch
    from ..inference.loading import load_model

    int8 = int8_kwargs(args)  # the flags checked before the model is built
    try:
        model = load_model(args.model, pretrained=args.pretrained, checkpoint_path=args.checkpoint_path,
                           backend=args.backend, int8=int8, **given_settings(args))
    except ImportError as e:  # the backend's package is missing: the message says which extra
        raise SystemExit(f"hrnetdet eval: error: --backend {args.backend}: {e}") from None
    # the runtimes run on the CPU
    device = "cpu" if args.backend != "torch" else args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    metrics = evaluate(model.to(device), args.ann, args.images, out_dir=args.out, device=device,
                       batch_size=args.batch_size, num_workers=args.num_workers, **mode_kwargs(args))
    print(format_table(metrics))
    if args.out:
        print(f"wrote {os.path.join(args.out, 'predictions.json')}, metrics.json, confusion_matrix.png/.json "
              f"and pr_curves_*.png/.json")
    return 0
