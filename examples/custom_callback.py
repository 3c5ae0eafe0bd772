"""Hook your own code into training: a callback that writes every step's losses and learning rate
and each validation's AP to a CSV file, and stops the run when the loss falls below a target.

    python examples/custom_callback.py --train-ann data/train.json --train-images data/train \
        [--val-ann data/val.json --val-images data/val] --out runs/csv --iters 200 [--stop-below 0.5]

The events, their order and what a callback sees: docs/TRAINING.md, 'Callbacks'. A run stopped by
the callback resumes with ``resume=True`` (here: run the same command again).
"""
import argparse
import csv
import os
from typing import Dict, List, Optional

import hrnetdet
from hrnetdet.data.coco import categories_of, read_annotations
from hrnetdet.engine import Callback
from hrnetdet.engine.state import TrainState
from hrnetdet.engine.train import seed_everything

COLUMNS = ["iteration", "epoch", "lr", "loss", "bbox_AP"]


class CSVLogger(Callback):
    """One row per step (``iteration, epoch, lr, loss``) and per validation (``bbox_AP``) in
    ``out_dir/steps.csv``, written by rank 0; ``stop_below`` ends the run when the loss is lower."""

    def __init__(self, stop_below: Optional[float] = None):
        self.stop_below = stop_below
        self.file = None
        self.writer = None

    def on_fit_start(self, state: TrainState) -> None:
        if state.run.rank != 0:
            return
        path = os.path.join(state.run.out_dir, "steps.csv")
        kept = []  # a resumed run keeps the rows up to its iteration (a killed run wrote some past it)
        if state.iteration > 0 and os.path.isfile(path):
            with open(path, newline="") as f:
                kept = [row for row in csv.DictReader(f) if int(row["iteration"]) <= state.iteration]
        self.file = open(path, "w", newline="")
        self.writer = csv.DictWriter(self.file, COLUMNS)
        self.writer.writeheader()
        self.writer.writerows(kept)

    def on_step_end(self, state: TrainState, losses: Dict[str, float]) -> None:
        if self.writer is not None:
            self.writer.writerow({"iteration": state.iteration, "epoch": state.epoch,
                                  "lr": state.optimizer.param_groups[0]["lr"], "loss": losses["loss"]})
        if self.stop_below is not None and not state.step_skipped and losses["loss"] < self.stop_below:
            state.request_stop(f"loss {losses['loss']:.3f} < {self.stop_below}")

    def on_validation_end(self, state: TrainState, metrics: Dict[str, float]) -> None:
        self.writer.writerow({"iteration": state.iteration, "epoch": state.epoch, "bbox_AP": metrics["bbox_AP"]})

    def on_checkpoint(self, state: TrainState, path: str) -> None:
        self.file.flush()  # the rows up to the checkpoint are on disk when the run resumes from it

    def on_fit_end(self, state: TrainState) -> None:
        if self.file is not None:
            self.file.close()
            self.file = self.writer = None


def main(argv: Optional[List[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--model", default="faster_rcnn_hrnetv2p_w18", help="architecture (default %(default)s)")
    p.add_argument("--train-ann", required=True, help="COCO instances json of the training set")
    p.add_argument("--train-images", required=True, help="image folder of the training set")
    p.add_argument("--val-ann", help="COCO instances json of the validation set")
    p.add_argument("--val-images", help="image folder of the validation set")
    p.add_argument("--out", default="runs/csv", help="run folder (default %(default)s)")
    p.add_argument("--iters", type=int, default=200, help="iterations (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=2, help="images per process (default %(default)s)")
    p.add_argument("--lr", type=float, help="learning rate (default: the recipe's)")
    p.add_argument("--min-size", type=int, default=800, help="shorter side in pixels (default %(default)s)")
    p.add_argument("--max-size", type=int, default=1333, help="longer side at most (default %(default)s)")
    p.add_argument("--stop-below", type=float, help="stop when the loss is lower than this")
    args = p.parse_args(argv)

    _, categories = categories_of(read_annotations(args.train_ann))
    seed_everything(0)  # before the model is built: the same command gives the same weights
    model = hrnetdet.create_model(args.model, num_classes=len(categories), categories=categories,
                                  min_size=args.min_size, max_size=args.max_size)
    summary = hrnetdet.fit(model, args.train_ann, args.train_images, args.val_ann, args.val_images, args.out,
                           iters=args.iters, batch_size=args.batch_size, lr=args.lr, resume=True, progress=False,
                           callbacks=[CSVLogger(args.stop_below)])
    if summary["stop_reason"]:
        print(f"stopped at iteration {summary['iterations']}: {summary['stop_reason']}; run again to continue")
    print(f"wrote {os.path.join(args.out, 'steps.csv')}")
    return summary


if __name__ == "__main__":
    main()
