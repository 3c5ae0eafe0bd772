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
from hrnetdet.engine.evaluate import format_table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="faster_rcnn_hrnetv2p_w18")
    p.add_argument("--train-ann", required=True)
    p.add_argument("--train-images", required=True)
    p.add_argument("--val-ann", required=True)
    p.add_argument("--val-images", required=True)
    p.add_argument("--out", default="runs/finetune")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--from-scratch", action="store_true", help="no COCO weights")
    args = p.parse_args()

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
