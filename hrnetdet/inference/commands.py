"""``hrnetdet predict``: detections on image and video files, folders, globs and URLs, written as
results.jsonl, COCO-results JSON and pictures (see ``predict_run``;
its arguments are in ``hrnetdet/cli.py``)."""
import argparse
import os

from .modes import mode_kwargs


def run_predict(args: argparse.Namespace) -> int:
    import torch

    from ..detectors.settings import given_settings
    from ..zoo.factory import create_model
    from ..names import names_weights
    from . import predict_run
    from .fast import optimize_for_inference
    from .sources import expand_inputs

    paths = expand_inputs(args.inputs)
    try:  # before the model is built: a refusal costs nothing
        predict_run.check_out_holds_no_input(paths, args.out)
    except predict_run.PredictRunError as e:
        raise SystemExit(f"hrnetdet predict: error: {e}") from None
    model = create_model(args.model, pretrained=args.pretrained or names_weights(args.model),
                         checkpoint_path=args.checkpoint_path, **given_settings(args))
    if args.fast or args.backend != "torch":
        try:
            optimize_for_inference(model, backend=args.backend)
        except ImportError as e:  # the backend's package is missing: the message says which extra
            raise SystemExit(f"hrnetdet predict: error: --backend {args.backend}: {e}") from None
    weights = {"--model": args.model, "--pretrained": args.pretrained, "--fast": args.fast, "--backend": args.backend,
               "--checkpoint": predict_run.input_identity(args.checkpoint_path) if args.checkpoint_path else None}
    try:
        counts = predict_run.run_predict(
            model, paths, args.out, score_thresh=args.score_thr, batch_size=args.batch_size,
            device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"), num_workers=args.workers,
            half=args.half, strict=args.strict, draw=not args.no_draw, save_video=args.save_video,
            mode=mode_kwargs(args), settings=weights)
    except predict_run.PredictRunError as e:
        raise SystemExit(f"hrnetdet predict: error: {e}") from None
    failed = os.path.join(args.out, predict_run.FAILED_TXT)
    if counts["failed"] and counts["succeeded"] == 0:
        raise SystemExit(f"hrnetdet predict: error: no input could be read ({counts['failed']} failed, listed "
                         f"in {failed})")
    duplicates = f", {counts['duplicates']} listed twice" if counts["duplicates"] else ""
    if counts["dropped"]:
        duplicates += f", {counts['dropped']} earlier results of inputs not in this run (or changed since) dropped"
    unreadable = f" (listed in {failed})" if counts["failed"] else ""
    print(f"{counts['done']} images or frames, {counts['detections']} detections scoring above "
          f"{args.score_thr}; {counts['skipped']} already done in {args.out}{duplicates}, "
          f"{counts['failed']} unreadable{unreadable}: {os.path.join(args.out, 'results.json')}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from ..detectors.settings import given_settings
    from ..zoo.factory import create_model
    from ..names import names_weights
    from .export import export

    model = create_model(args.model, pretrained=names_weights(args.model), checkpoint_path=args.checkpoint_path,
                         **given_settings(args))
    export(model, args.out, args.format, dynamic=args.dynamic, half=args.half, opset=args.opset,
           log=lambda line: print(f"check against eager, {line}"))
    print(f"{args.model}: {args.format} written to {args.out}")
    return 0
