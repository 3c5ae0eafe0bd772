"""``hrnetdet serve MODEL``: the model (as ``predict`` takes it) behind an HTTP API (``server``),
LitServe imported here only, so the rest of hrnetdet runs without the ``serve`` extra."""
import argparse
import os
import tempfile
from typing import Any, Dict, Tuple

API_KEY_ENV = "HRNETDET_API_KEY"


def require_litserve() -> None:
    try:
        import litserve  # noqa: F401
    except ImportError:
        raise SystemExit("hrnetdet serve: error: serving needs LitServe: pip install 'hrnetdet[serve]'") from None


def accelerator_of(device: str) -> Tuple[str, Any]:
    """``--device`` as LitServe's (accelerator, devices): cpu, cuda (all: one worker set each) or cuda:N."""
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and not index.isdigit()):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if kind == "cpu":
        return "cpu", "auto"
    return kind, [int(index)] if index else 1


def base_options(args: argparse.Namespace) -> Any:
    """The options every request starts from (``--score-thresh``, ``--max-det`` default to the model's)."""
    from ..inference.options import OptionError, PredictOptions

    fields = {} if args.max_pixels is None else {"max_pixels": args.max_pixels}
    try:
        return PredictOptions(score_thresh=args.score_thresh, max_det=args.max_det, **fields)
    except OptionError as e:
        args.command_parser.error(e.cli_message())


def run_serve(args: argparse.Namespace) -> int:
    require_litserve()
    import torch

    from ..detectors.settings import given_settings
    from ..inference.commands import int8_kwargs
    from ..inference.predict import allow_pixels
    from ..io import private_dir
    from ..threads import default_num_threads
    from .model import DetectorAPI, ModelSpec
    from .server import Limits, ServerError, Service, run_server

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    accelerator, devices = accelerator_of(device)
    options = base_options(args)
    int8 = int8_kwargs(args)
    allow_pixels(options.pixel_limit)
    torch.set_num_threads(1)  # this process reads and decodes requests; the workers run the model
    report_dir = private_dir(tempfile.mkdtemp(prefix="hrnetdet-serve-"))
    report_path = os.path.join(report_dir, "worker.json")
    threads = args.threads or max(1, default_num_threads() // args.workers)
    spec = ModelSpec(model=args.model, checkpoint_path=args.checkpoint_path, pretrained=args.pretrained,
                     settings=given_settings(args), backend=args.backend, fast=args.fast, int8=int8,
                     half=args.half, threads=threads, report_path=report_path)
    api = DetectorAPI(spec, max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout)
    service = Service(Limits(int(args.max_upload_mb * 2 ** 20), options.pixel_limit),
                      args.api_key or os.environ.get(API_KEY_ENV) or None, options)
    try:
        run_server(api, service, host=args.host, port=args.port, accelerator=accelerator, devices=devices,
                   workers=args.workers, report_path=report_path,
                   on_ready=lambda info, port: print(ready_line(info, args, port), flush=True))
    except ServerError as e:
        raise SystemExit(f"hrnetdet serve: error: the model could not be loaded: {e}") from None
    finally:
        for name in os.listdir(report_dir):
            os.remove(os.path.join(report_dir, name))
        os.rmdir(report_dir)
    return 0


def ready_line(info: Dict[str, Any], args: argparse.Namespace, port: int) -> str:
    key = ", API key required" if args.api_key or os.environ.get(API_KEY_ENV) else ""
    return (f"hrnetdet serve: {info['model']} on http://{args.host}:{port} ({args.workers} worker(s), batches of "
            f"up to {args.max_batch_size}{key}); POST /predict, GET /health /info /metrics, the page at /")


def run_remote_predict(args: argparse.Namespace) -> int:
    """``hrnetdet predict --server URL``: the predict command with the server's model (the files a
    local run writes; LitServe not needed)."""
    from ..inference.commands import run_predict
    from .client import Client, RemoteEngine

    return run_predict(args, engine=RemoteEngine(Client(args.server)))
