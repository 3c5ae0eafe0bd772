"""Maintainer tool: every weight set of the zoo on COCO val2017 (pycocotools), then MODEL_ZOO.md's
"(hrnetdet)" columns from the results.

    python tools/eval_zoo.py --coco DIR [--only PATTERN]
    torchrun --nproc_per_node 8 tools/eval_zoo.py --coco DIR      # sharded: one process per GPU

DIR holds ``annotations/instances_val2017.json`` and ``val2017/``. Each weight set is loaded with
``pretrained=True`` (its pinned Hub file, or the converted reference) at its reference settings, on
the GPU of the process's LOCAL_RANK when there is one. Under torchrun each process takes every
WORLD_SIZE-th image and rank 0 scores the gathered detections. Resumable: each weight set's
figures go to ``OUT/ARCH.TAG.json`` (atomically) and a set with a file there is skipped; the
summary (``--summary``, box/mask AP x 100 per weight set, which tools/model_zoo.py reads) is
rewritten from those files after each set, and MODEL_ZOO.md regenerated at the end.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch.distributed as dist

from hrnetdet.data.coco import CocoDetection
from hrnetdet.engine.evaluate import check_categories, coco_predictions, default_iou_types, score
from hrnetdet.engine.loop import setup_distributed
from hrnetdet.io import atomic_write_text
from hrnetdet.version import __version__
from hrnetdet.zoo.factory import create_model
from hrnetdet.zoo.registry import list_models
import model_zoo

KEYS = {"bbox": "box_ap", "segm": "mask_ap"}  # the registry's metric names


def dataset(coco_dir: str) -> CocoDetection:
    return CocoDetection(os.path.join(coco_dir, "annotations", "instances_val2017.json"),
                         os.path.join(coco_dir, "val2017"), with_masks=False)


def evaluate_weight_set(name: str, ds: CocoDetection, rank: int, world: int, device: Any,
                        batch_size: int) -> Optional[Dict[str, Any]]:
    """This process's shard of the images through ``name``'s weights; rank 0 gets the figures of
    every shard's detections together, the other ranks None."""
    model = create_model(name, pretrained=True)
    check_categories(model, ds)
    started = time.perf_counter()
    mine = coco_predictions(model, ds, device=device, indices=range(rank, len(ds), world),
                            batch_size=batch_size, progress=rank == 0)
    parts = [mine]
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, mine)
    if rank != 0:
        return None
    metrics, _ = score(ds, [r for part in parts for r in part], default_iou_types(model))
    return {**metrics, "weights": name, "processes": world, "device": str(device),
            "seconds": round(time.perf_counter() - started, 1), "hrnetdet_version": __version__}


def summary(out_dir: Path) -> Dict[str, Dict[str, float]]:
    """Box/mask AP x 100 of every weight set evaluated in ``out_dir`` (the registry's units)."""
    table = {}
    for path in sorted(out_dir.glob("*.json")):
        metrics = json.loads(path.read_text())
        table[metrics["weights"]] = {KEYS[t]: round(100 * metrics[t]["stats"]["AP"], 1) for t in KEYS if t in metrics}
    return table


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coco", required=True, help="COCO folder: annotations/instances_val2017.json and val2017/")
    parser.add_argument("--only", default="", help="a wildcard over arch.tag (default: every weight set)")
    parser.add_argument("--out", default="eval_zoo", help="one figures file per weight set (default: ./eval_zoo)")
    parser.add_argument("--summary", default=str(model_zoo.COCO_EVAL), help=f"default: {model_zoo.COCO_EVAL}")
    parser.add_argument("--model-zoo", default=str(model_zoo.MODEL_ZOO), help=f"default: {model_zoo.MODEL_ZOO}")
    parser.add_argument("--device", help="default: the GPU of LOCAL_RANK when there is one, else the CPU")
    parser.add_argument("--batch-size", type=int, default=1)
    args = parser.parse_args(argv)
    names = list_models(args.only, pretrained=True)
    if not names:
        parser.error(f"--only {args.only!r} matches no weight set (`hrnetdet models --pretrained` lists them)")
    ds = dataset(args.coco)
    out_dir = Path(args.out)
    todo = [n for n in names if not (out_dir / f"{n}.json").exists()]  # every rank decides alike, before any write
    rank, world, device, created = setup_distributed(args.device)
    if rank == 0:
        print(f"{len(names) - len(todo)} of {len(names)} weight sets already evaluated in {out_dir}; "
              f"{len(todo)} to go on {world} process(es), {device}")
    try:
        for name in todo:
            metrics = evaluate_weight_set(name, ds, rank, world, device, args.batch_size)
            if metrics is None:
                continue
            out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(str(out_dir / f"{name}.json"), json.dumps(metrics, indent=1))
            table = summary(out_dir)
            atomic_write_text(args.summary, json.dumps(table, indent=1) + "\n")
            print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in table[name].items()) + f" ({metrics['seconds']} s)")
        if rank == 0 and Path(args.summary).exists():
            model_zoo.main(["--out", args.model_zoo, "--coco-eval", args.summary])
    finally:
        if created:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
