"""Fine-tune a COCO-pretrained HRNetV2p detector on your own COCO-format dataset, evaluate it and
reload the best checkpoint.

    python examples/finetune_custom_coco.py --train-ann data/train.json --train-images data/train \
        --val-ann data/val.json --val-images data/val --out runs/mydata [--model mask_rcnn_hrnetv2p_w18]

Multi-GPU: ``torchrun --nproc_per_node=4 examples/finetune_custom_coco.py ...`` (or ``hrnetdet train``).
Without network access, run ``hrnetdet download MODEL.TAG`` on a connected machine first, or pass
``--from-scratch``.
"""
import argparse
import os

import hrnetdet
from hrnetdet.data.coco import categories_of, read_annotations
from hrnetdet.engine import fit, format_table
from hrnetdet.threads import THREADS_HELP, set_num_threads


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--model", default="faster_rcnn_hrnetv2p_w18", help="architecture (default %(default)s)")
    p.add_argument("--train-ann", required=True, help="COCO instances json of the training set")
    p.add_argument("--train-images", required=True, help="image folder of the training set")
    p.add_argument("--val-ann", required=True, help="COCO instances json of the validation set")
    p.add_argument("--val-images", required=True, help="image folder of the validation set")
    p.add_argument("--out", default="runs/finetune", help="run folder (default %(default)s)")
    p.add_argument("--epochs", type=int, default=12, help="passes over the training set (default 12)")
    p.add_argument("--batch-size", type=int, default=2, help="images per process (default 2)")
    p.add_argument("--from-scratch", action="store_true", help="no COCO weights")
    p.add_argument("--threads", type=int, help=THREADS_HELP)
    args = p.parse_args()
    set_num_threads(args.threads)

    # The dataset's categories (ascending id) become labels 1..K; the COCO weights keep everything
    # but the class-dependent layers, which are re-initialised for K + 1 classes.
    _, categories = categories_of(read_annotations(args.train_ann))
    model = hrnetdet.create_model(args.model, pretrained=not args.from_scratch, num_classes=len(categories),
                                  categories=categories)
    summary = hrnetdet.fit(model, args.train_ann, args.train_images, args.val_ann, args.val_images, args.out,
                  epochs=args.epochs, batch_size=args.batch_size, resume=True)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    best = hrnetdet.create_model(args.model, checkpoint_path=summary["best"])
    metrics = hrnetdet.evaluate(best, args.val_ann, args.val_images, out_dir=os.path.join(args.out, "eval"))
    print(format_table(metrics))
    print(f"best checkpoint: {summary['best']}; curves and metrics.jsonl in {args.out}")


if __name__ == "__main__":
    main()
