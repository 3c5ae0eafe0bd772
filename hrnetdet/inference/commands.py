"""``hrnetdet predict``: detections on image files, folders and globs, written as COCO-results
JSON and as pictures."""
import argparse
import json
import os

import torch


def _predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", help="image files, folders or glob patterns")
    p.add_argument("--model", required=True, help="architecture, optionally with a weight tag (NAME[.tag])")
    p.add_argument("--checkpoint", help="a reference .pth or hrnetdet .safetensors file")
    p.add_argument("--pretrained", action="store_true", help="load the published weights of --model")
    p.add_argument("--score-thr", type=float, default=0.3, help="keep detections scoring above this (0.3)")
    p.add_argument("--out", default="predictions", help="output folder (./predictions)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--min-size", type=int, help="test resize: shorter side (the model's default: 800)")
    p.add_argument("--max-size", type=int, help="test resize: longer side cap (the model's default: 1333)")
    p.add_argument("--fast", action="store_true", help="use the inference fast path (optimize_for_inference)")
    p.add_argument("--backend", default="torch", choices=["torch", "auto", "onnxruntime", "openvino"],
                   help="run the dense parts in this runtime, exported once and cached (auto: the fastest "
                        "installed; default: torch)")
    p.add_argument("--no-draw", action="store_true", help="write the JSON only, no pictures")


def _predict_run(args: argparse.Namespace) -> int:
    from torchvision.io import write_jpeg

    from ..visualize import draw
    from ..zoo.factory import create_model
    from .fast import optimize_for_inference
    from .predict import coco_results, expand_inputs, predict

    if not args.checkpoint and not args.pretrained and "." not in args.model:
        raise SystemExit("hrnetdet predict: give --checkpoint PATH, --pretrained or a NAME.tag with weights")
    try:
        paths = expand_inputs(args.inputs)
    except FileNotFoundError as e:
        raise SystemExit(f"hrnetdet predict: {e}") from None
    kwargs = {k: v for k, v in (("min_size", args.min_size), ("max_size", args.max_size)) if v is not None}
    model = create_model(args.model, pretrained=args.pretrained or "." in args.model,
                         checkpoint_path=args.checkpoint, **kwargs)
    if args.fast or args.backend != "torch":
        try:
            optimize_for_inference(model, backend=args.backend)
        except ImportError as e:  # the backend's package is missing: the message says which extra
            raise SystemExit(f"hrnetdet predict: --backend {args.backend}: {e}") from None
    try:
        results = predict(model.to(args.device), paths, score_thresh=args.score_thr,
                          batch_size=args.batch_size, progress=True)
    except ValueError as e:  # an unreadable image: the message names the file
        raise SystemExit(f"hrnetdet predict: {e}") from None
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


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="architecture, optionally with a weight tag (NAME[.tag])")
    p.add_argument("--checkpoint", help="a reference .pth or hrnetdet .safetensors file")
    p.add_argument("--format", required=True, choices=["torchscript", "onnx", "openvino"])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--dynamic", action="store_true",
                   help="ONNX/OpenVINO graphs for any image size (default: the padded size of a 480x640 image)")
    p.add_argument("--half", action="store_true", help="OpenVINO: store the weights in float16")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (17)")
    p.add_argument("--min-size", type=int, help="test resize: shorter side (the model's default: 800)")
    p.add_argument("--max-size", type=int, help="test resize: longer side cap (the model's default: 1333)")


def _export_run(args: argparse.Namespace) -> int:
    from ..zoo.factory import create_model
    from .export import export

    kwargs = {k: v for k, v in (("min_size", args.min_size), ("max_size", args.max_size)) if v is not None}
    model = create_model(args.model, pretrained="." in args.model, checkpoint_path=args.checkpoint, **kwargs)
    try:
        export(model, args.out, args.format, dynamic=args.dynamic, half=args.half, opset=args.opset,
               log=lambda line: print(f"check against eager, {line}"))
    except (ImportError, ValueError) as e:  # a missing runtime package, or --half where it cannot apply
        raise SystemExit(f"hrnetdet export: {e}") from None
    print(f"{args.model}: {args.format} written to {args.out}")
    return 0


COMMANDS = {
    "predict": {"help": "detect objects in images; writes COCO-results JSON and pictures",
                "add_arguments": _predict_args, "run": _predict_run},
    "export": {"help": "export a model to TorchScript, ONNX or OpenVINO, checked against eager",
               "add_arguments": _export_args, "run": _export_run},
}
