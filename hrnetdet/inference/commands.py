"""``hrnetdet predict``: detections on image and video files, folders, globs and URLs, written as
results.jsonl, COCO-results JSON and pictures (see ``predict_run``;
its arguments are in ``hrnetdet/cli.py``)."""
import argparse
import os
from typing import Any, Dict, Optional

from .modes import mode_kwargs
from .options import OptionError, PredictOptions


def predict_options(args: argparse.Namespace) -> PredictOptions:
    """The ``PredictOptions`` record of the parsed flags (each flag is a field), checked before the
    model is built or any input is read; a bad value is one line naming its flag (exit 2, as
    argparse refuses a flag)."""
    import torch

    fields = dict(score_thresh=args.score_thresh, batch_size=args.batch_size, num_workers=args.num_workers,
                  half=args.half, device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
                  classes=args.classes, max_det=args.max_det, line_width=args.line_width,
                  label_size=args.label_size, **mode_kwargs(args))
    if args.max_pixels is not None:
        fields["max_pixels"] = args.max_pixels
    try:
        return PredictOptions(**fields)
    except OptionError as e:
        args.command_parser.error(e.cli_message())


def run_predict(args: argparse.Namespace) -> int:
    from ..detectors.settings import given_settings
    from ..zoo.factory import create_model
    from ..names import names_weights
    from . import predict_run
    from .fast import optimize_for_inference
    from .sources import expand_inputs

    options = predict_options(args)
    int8 = int8_kwargs(args)
    paths = expand_inputs(args.inputs)
    try:  # before the model is built: a refusal costs nothing
        predict_run.check_out_holds_no_input(paths, args.out)
    except predict_run.PredictRunError as e:
        raise SystemExit(f"hrnetdet predict: error: {e}") from None
    model = create_model(args.model, pretrained=args.pretrained or names_weights(args.model),
                         checkpoint_path=args.checkpoint_path, **given_settings(args))
    if args.fast or args.backend != "torch":
        try:
            optimize_for_inference(model, backend=args.backend, **int8)
        except ImportError as e:  # the backend's package is missing: the message says which extra
            raise SystemExit(f"hrnetdet predict: error: --backend {args.backend}: {e}") from None
    weights = {"--model": args.model, "--pretrained": args.pretrained, "--fast": args.fast, "--backend": args.backend,
               "--checkpoint": predict_run.input_identity(args.checkpoint_path) if args.checkpoint_path else None}
    if int8:  # int8 detections differ from float32 ones: a rerun into the folder must not mix them
        weights["--int8"] = {"--calibration": args.calibration, "--calibration-size": args.calibration_size}
    try:
        counts = predict_run.run_predict(model, paths, args.out, options, strict=args.strict, draw=not args.no_draw,
                                         save_video=args.save_video, settings=weights)
    except predict_run.PredictRunError as e:
        raise SystemExit(f"hrnetdet predict: error: {e}") from None
    except OptionError as e:  # a class the model does not know
        args.command_parser.error(e.cli_message())
    print(summary(counts, args.out, options))
    return 0


def summary(counts: Dict[str, Optional[int]], out: str, options: PredictOptions) -> str:
    """The run's closing line; a run where no input could be read is an error."""
    failed = os.path.join(out, "failed.txt")
    if counts["failed"] and counts["succeeded"] == 0:
        raise SystemExit(f"hrnetdet predict: error: no input could be read ({counts['failed']} failed, listed "
                         f"in {failed})")
    duplicates = f", {counts['duplicates']} listed twice" if counts["duplicates"] else ""
    if counts["dropped"]:
        duplicates += f", {counts['dropped']} earlier results of inputs not in this run (or changed since) dropped"
    unreadable = f" (listed in {failed})" if counts["failed"] else ""
    return (f"{counts['done']} images or frames, {counts['detections']} detections scoring above "
            f"{options.score_thresh}; {counts['skipped']} already done in {out}{duplicates}, "
            f"{counts['failed']} unreadable{unreadable}: {os.path.join(out, 'results.json')}")


def run_export(args: argparse.Namespace) -> int:
    from ..detectors.settings import given_settings
    from ..zoo.factory import create_model
    from ..names import names_weights
    from .export import export

    int8 = int8_kwargs(args, backend=False)
    model = create_model(args.model, pretrained=names_weights(args.model), checkpoint_path=args.checkpoint_path,
                         **given_settings(args))
    try:
        export(model, args.out, args.format, dynamic=args.dynamic, half=args.half, opset=args.opset,
               log=lambda line: print(f"check against eager, {line}"), **int8)
    except ImportError as e:  # a quantizer's package is missing: the message says which extra
        raise SystemExit(f"hrnetdet export: error: --int8: {e}") from None
    print(f"{args.model}: {'int8 ' if int8 else ''}{args.format} written to {args.out}")
    return 0


def int8_kwargs(args: argparse.Namespace, backend: bool = True) -> Dict[str, Any]:
    """``optimize_for_inference``'s (or ``export``'s) int8 keywords from ``--int8``,
    ``--calibration`` and ``--calibration-size``; a flag that needs another is refused as argparse
    refuses a flag (exit 2)."""
    error = args.command_parser.error
    if not args.int8:
        if args.calibration:
            error("--calibration: only with --int8")
        return {}
    if not args.calibration:
        error("--int8 needs --calibration PATH (an image folder or a COCO json)")
    if len(args.calibration) > 2:
        error("--calibration: an image folder, a COCO json, or a COCO json and its image folder (at most 2 paths)")
    if backend and args.backend == "torch":
        error("--int8 runs in a runtime: add --backend openvino, onnxruntime or auto")
    calibration = args.calibration[0] if len(args.calibration) == 1 else tuple(args.calibration)
    return {"precision": "int8", "calibration": calibration, "calibration_size": args.calibration_size}
    return 0
