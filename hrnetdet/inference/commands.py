"""``hrnetdet predict``: detections on image and video files, folders, globs and URLs, written as
results.jsonl, COCO-results JSON and pictures (see ``predict_run``)."""
import argparse
import os

import torch


def _predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", help="image or video files, folders, glob patterns or http(s) URLs")
    p.add_argument("--model", required=True, help="architecture, optionally with a weight tag (NAME[.tag])")
    p.add_argument("--checkpoint", help="a reference .pth or hrnetdet .safetensors file")
    p.add_argument("--pretrained", action="store_true", help="load the published weights of --model")
    p.add_argument("--score-thr", type=float, default=0.3, help="keep detections scoring above this (0.3)")
    p.add_argument("--out", default="predictions",
                   help="output folder (./predictions); a rerun into it skips the inputs already done")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--workers", type=int, help="image decoding processes (default: half the cores, at most 4)")
    p.add_argument("--half", action="store_true", help="half precision: float16 on CUDA, bfloat16 on the CPU")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable input instead of skipping it")
    p.add_argument("--save-video", action="store_true", help="write an annotated video for each video input")
    p.add_argument("--min-size", type=int, help="test resize: shorter side (the model's default: 800)")
    p.add_argument("--max-size", type=int, help="test resize: longer side cap (the model's default: 1333)")
    p.add_argument("--fast", action="store_true", help="use the inference fast path (optimize_for_inference)")
    p.add_argument("--no-draw", action="store_true", help="write the results only, no pictures")


def _predict_run(args: argparse.Namespace) -> int:
    from ..zoo.factory import create_model
    from .fast import optimize_for_inference
    from .predict_run import PredictRunError, run_predict
    from .sources import expand_inputs

    if not args.checkpoint and not args.pretrained and "." not in args.model:
        raise SystemExit("hrnetdet predict: give --checkpoint PATH, --pretrained or a NAME.tag with weights")
    try:
        paths = expand_inputs(args.inputs)
    except FileNotFoundError as e:
        raise SystemExit(f"hrnetdet predict: {e}") from None
    kwargs = {k: v for k, v in (("min_size", args.min_size), ("max_size", args.max_size)) if v is not None}
    model = create_model(args.model, pretrained=args.pretrained or "." in args.model,
                         checkpoint_path=args.checkpoint, **kwargs)
    if args.fast:
        optimize_for_inference(model)
    try:
        counts = run_predict(model, paths, args.out, score_thresh=args.score_thr, batch_size=args.batch_size,
                             device=args.device, num_workers=args.workers, half=args.half, strict=args.strict,
                             draw=not args.no_draw, save_video=args.save_video)
    except PredictRunError as e:
        raise SystemExit(f"hrnetdet predict: {e}") from None
    print(f"{counts['done']} images or frames, {counts['detections']} detections scoring above "
          f"{args.score_thr}; {counts['skipped']} already done, {counts['failed']} unreadable: "
          f"{os.path.join(args.out, 'results.json')}")
    return 0


COMMANDS = {
    "predict": {"help": "detect objects in images; writes COCO-results JSON and pictures",
                "add_arguments": _predict_args, "run": _predict_run},
}
