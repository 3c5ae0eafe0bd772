"""``hrnetdet predict``: detections on image files, folders and globs, written as COCO-results
JSON and as pictures (its arguments are in ``hrnetdet/cli.py``)."""
import argparse
import json
import os

from .modes import mode_kwargs


def run_predict(args: argparse.Namespace) -> int:
    import torch
    from torchvision.io import write_jpeg

    from ..visualize import draw
    from ..zoo.factory import create_model
    from .fast import optimize_for_inference
    from .predict import coco_results, expand_inputs, predict

    paths = expand_inputs(args.inputs)
    kwargs = {k: v for k, v in (("min_size", args.min_size), ("max_size", args.max_size)) if v is not None}
    model = create_model(args.model, pretrained=args.pretrained or "." in args.model,
                         checkpoint_path=args.checkpoint, **kwargs)
    if args.fast:
        optimize_for_inference(model)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    results = predict(model.to(device), paths, score_thresh=args.score_thr, batch_size=args.batch_size,
                      progress=True, **mode_kwargs(args))
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "results.json")
    with open(json_path, "w") as f:
        json.dump(coco_results(results, model.categories), f)
    if not args.no_draw:
        stems = {}
        for res in results:
            stem = os.path.splitext(os.path.basename(res["file_name"]))[0]
            stems[stem] = stems.get(stem, 0) + 1
            name = stem if stems[stem] == 1 else f"{stem}_{stems[stem] - 1}"
            write_jpeg(draw(res["file_name"], res), os.path.join(args.out, f"{name}.jpg"), quality=90)
    n = sum(len(r["scores"]) for r in results)
    print(f"{len(results)} images, {n} detections scoring above {args.score_thr}: {json_path}")
    return 0
