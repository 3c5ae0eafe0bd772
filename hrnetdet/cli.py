"""hrnetdet: train, evaluate and run HRNetV2p object detectors; list, fetch and convert their weights.

The parser is built here without importing torch, so ``--help`` answers at once; each command's
``run(args)`` lives beside the code it drives and is imported only when that command runs. Errors a
user can fix print as one line naming the flag (``--debug`` or ``HRNETDET_DEBUG=1``: the traceback).
"""
import argparse
import contextlib
import importlib
import os
import re
import sys
import warnings
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional

from .names import names_weights, saved_model_folder
from .threads import THREADS_HELP, set_num_threads
from .version import __version__


class Parser(argparse.ArgumentParser):
    """argparse's parser with one-line errors: the usage is one ``--help`` away."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def existing_file(path: str) -> str:
    """A file the command reads after importing torch or building the model: checked before it starts."""
    if not os.path.exists(path):
        raise argparse.ArgumentTypeError(f"file not found: {path}")
    if not os.path.isfile(path):
        raise argparse.ArgumentTypeError(f"not a regular file: {path}")
    return path


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a whole number of at least 1, got {text!r}")
    return int(text)


def existing_folder(path: str) -> str:
    if not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"folder not found: {path}")
    return path


def output_folder(path: str) -> str:
    """A folder the command creates or writes into: refused at once when a file is in its place."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{path} exists and is not a folder")
    return path


class Command(NamedTuple):
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: str  # "module:function", imported when the command runs
    uses_torch: bool = True  # False: the command reads tables only, and torch (its threads) is not loaded


MODEL_HELP = ("NAME[.tag], a folder save_pretrained wrote (a training run, its best/ or last/, an export) "
              "or hf-hub:org/name")


def alias(p: argparse.ArgumentParser, old: str, new: str) -> None:
    """An earlier spelling of the flag ``new``, still accepted, no longer shown."""
    action = next(a for a in p._actions if new in a.option_strings)
    p.add_argument(old, dest=action.dest, type=action.type, nargs=action.nargs, const=action.const,
                   default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _weights_args(p: argparse.ArgumentParser, model_help: str = MODEL_HELP) -> None:
    p.add_argument("--model", required=True, help=model_help)
    p.add_argument("--checkpoint-path", type=existing_file,
                   help="a .safetensors (e.g. RUN_DIR/best/model.safetensors) or reference .pth file")
    alias(p, "--checkpoint", "--checkpoint-path")
    p.add_argument("--pretrained", nargs="?", const=True, default=False, metavar="TAG",
                   help="the published COCO weights of --model (or of this tag)")


def _device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")


def _max_size_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-size", type=positive_int, help="longer side cap (the model's default: 1333)")


def _backend_arg(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--backend", default="torch", choices=["torch", "auto", "onnxruntime", "openvino"], help=help)


def _int8_args(p: argparse.ArgumentParser) -> None:
    """``--int8`` with its calibration set, for ``predict``, ``eval`` and ``export``."""
    p.add_argument("--int8", action="store_true", help="int8 graphs quantized after training, calibrated on "
                   "--calibration (with --backend openvino|onnxruntime|auto, or export --format onnx|openvino)")
    p.add_argument("--calibration", nargs="+", metavar="PATH", help="calibration images for --int8: an image "
                   "folder, a COCO json (file names relative to it), or a COCO json and its image folder")
    # 128: quantize.DEFAULT_CALIBRATION_SIZE (not imported: the parser runs without torch)
    p.add_argument("--calibration-size", type=positive_int, default=128, metavar="N",
                   help="calibrate on the first N images (128)")


def _num_workers_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-workers", type=int, default=2, help="data loader processes (default 2)")
    alias(p, "--workers", "--num-workers")


def _models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("pattern", nargs="?", default="", help="wildcard filter, e.g. '*w32*'")
    p.add_argument("--pretrained", action="store_true", help="list arch.tag names with published weights")


def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=existing_file, help="a reference (mmdetection) .pth checkpoint")
    p.add_argument("--model", help="architecture name; inferred from the checkpoint when omitted")
    p.add_argument("--out", type=output_folder, required=True,
                   help="output folder for model.safetensors and config.json")


def _download_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("names", nargs="+", help="arch, arch.tag or a wildcard ('*w18*')")
    p.add_argument("--dir", type=output_folder,
                   help="a folder to fill (to copy to an offline machine); default: the caches")
    p.add_argument("--backbone", action="store_true",
                   help="names are timm HRNets (hrnet_w32.ms_in1k), for --weights-backbone")


def _push_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=existing_folder, metavar="RUN_DIR",
                   help="a training run folder (hrnetdet train --out)")
    p.add_argument("--repo", required=True, help="the Hub repository to create or update, e.g. org/name")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--token", help="a Hub token (default: the logged-in one)")


def _train_args(p: argparse.ArgumentParser) -> None:
    _weights_args(p, "architecture, e.g. faster_rcnn_hrnetv2p_w18, or a model to fine-tune (" + MODEL_HELP + ")")
    p.add_argument("--train-ann", type=existing_file, required=True, help="COCO instances json of the training set")
    p.add_argument("--train-images", type=existing_folder, required=True, help="image folder of the training set")
    p.add_argument("--val-ann", type=existing_file, help="COCO instances json of the validation set")
    p.add_argument("--val-images", type=existing_folder, help="image folder of the validation set")
    p.add_argument("--out", type=output_folder, required=True, help="run folder: checkpoints, metrics.jsonl, curves")
    length = p.add_mutually_exclusive_group(required=True)
    length.add_argument("--epochs", type=positive_int, help="training length in passes over the training set")
    length.add_argument("--iters", type=positive_int, help="training length in iterations (batches per process)")
    p.add_argument("--batch-size", type=positive_int, default=2, help="images per process (default 2)")
    p.add_argument("--lr", type=float, help="default: the family's rate x total batch / 16")
    p.add_argument("--schedule", help="the reference's step schedule by name (default: the family's own)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available; torchrun: LOCAL_RANK)")
    p.add_argument("--amp", nargs="?", const=True, default=False, choices=[True, "bf16", "fp16"],
                   help="mixed precision on CUDA (bf16 where supported, else fp16)")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/training_state.pt")
    p.add_argument("--weights-backbone", nargs="?", const=True, default=None, metavar="TIMM_NAME",
                   help="initialise the HRNet from timm's ImageNet weights (without detector weights)")
    p.add_argument("--min-size", type=positive_int, nargs="+", help="shorter side(s); several = multi-scale training")
    _max_size_arg(p)
    _num_workers_arg(p)
    p.add_argument("--seed", type=int, default=0, help="seeds the model's initialisation and the run")
    p.add_argument("--keep-empty", action="store_true", help="keep training images without annotations")
    p.add_argument("--aug", choices=("none", "flip", "photometric", "scale-jitter"), default="flip",
                   help="augmentation preset (default flip: the reference's horizontal flip)")
    p.add_argument("--ema", nargs="?", type=float, const=0.9998, default=None, metavar="DECAY",
                   help="validate and save an exponential moving average of the weights (decay 0.9998)")
    p.add_argument("--patience", type=positive_int, metavar="N",
                   help="stop when validation bbox AP has not improved for N validations")
    p.add_argument("--checkpoint-every", type=positive_int, metavar="N",
                   help="iterations between checkpoints and validations (default: about 10 per run)")
    p.add_argument("--log-every", type=positive_int, metavar="N",
                   help="iterations between metrics records (default: about 50 per run, at most 20 apart)")
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="recompute the HRNet body's activations in the backward pass: less memory, more time")


def _mode_args(p: argparse.ArgumentParser) -> None:
    """``--slice``, ``--overlap``, ``--no-full-image`` and ``--tta``, for ``predict`` and ``eval``."""
    p.add_argument("--slice", type=positive_int, metavar="S",
                   help="sliced inference: SxS tiles at native resolution (for large images, small objects)")
    p.add_argument("--overlap", type=float, default=0.2, help="tile overlap, a fraction of S (0.2)")
    p.add_argument("--no-full-image", dest="full_image", action="store_false",
                   help="with --slice: skip the pass over the whole resized image")
    p.add_argument("--tta", action="store_true", help="test-time augmentation: flip x scales 0.8, 1, 1.2")


def _eval_args(p: argparse.ArgumentParser) -> None:
    _weights_args(p)
    p.add_argument("--ann", type=existing_file, required=True, help="COCO instances json")
    p.add_argument("--images", type=existing_folder, required=True, help="image folder")
    p.add_argument("--out", type=output_folder, help="folder for predictions.json (COCO results), metrics.json, "
                                                     "a confusion matrix and precision-recall curves")
    _device_arg(p)
    p.add_argument("--min-size", type=positive_int, help="shorter side (the model's default: 800)")
    _max_size_arg(p)
    p.add_argument("--batch-size", type=positive_int, default=1, help="images per batch (default 1)")
    _num_workers_arg(p)
    _mode_args(p)
    _backend_arg(p, "run the dense parts in this runtime on the CPU, exported once and cached (default: torch)")
    _int8_args(p)


def _predict_args(p: argparse.ArgumentParser) -> None:
    """The flags are ``PredictOptions``' fields (``--score-thresh`` is ``score_thresh``), which
    checks their values; ``--score-thr`` and ``--workers`` are the old spellings, kept hidden."""
    p.add_argument("inputs", nargs="+", help="image or video files, folders, glob patterns or http(s) URLs "
                   "(before a bare --pretrained)")
    _weights_args(p, "architecture, optionally with a weight tag (NAME[.tag])")
    p.add_argument("--score-thresh", type=float, default=0.3, help="keep detections scoring above this (0.3)")
    alias(p, "--score-thr", "--score-thresh")
    p.add_argument("--classes", nargs="+", metavar="CLASS",
                   help="keep only these classes: category names or label ids (e.g. --classes person car)")
    p.add_argument("--max-det", type=int, metavar="N", help="keep the N best detections per image")
    p.add_argument("--out", type=output_folder, default="predictions",
                   help="output folder (./predictions); a rerun into it skips the inputs already done")
    _device_arg(p)
    p.add_argument("--batch-size", type=int, default=1, help="images per batch (default 1)")
    p.add_argument("--num-workers", type=int, help="image decoding processes (default: half the cores, at most 4)")
    alias(p, "--workers", "--num-workers")
    p.add_argument("--max-pixels", type=int, metavar="N",
                   help="refuse (skip) images over N pixels (default 64 million; 0: no limit)")
    p.add_argument("--half", action="store_true", help="half precision: float16 on CUDA, bfloat16 on the CPU")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable input instead of skipping it")
    p.add_argument("--save-video", action="store_true", help="write an annotated video for each video input")
    p.add_argument("--min-size", type=positive_int, help="test resize: shorter side (the model's default: 800)")
    _max_size_arg(p)
    p.add_argument("--fast", action="store_true", help="use the inference fast path (optimize_for_inference)")
    _backend_arg(p, "run the dense parts in this runtime, exported once and cached (auto: the fastest installed; "
                    "default: torch)")
    p.add_argument("--no-draw", action="store_true", help="write the results only, no pictures")
    p.add_argument("--server", metavar="URL", help="detections from a `hrnetdet serve` server instead of --model "
                                                   "(same files; its API key from HRNETDET_API_KEY)")
    next(a for a in p._actions if a.dest == "model").required = False  # --model or --server: checked in main
    p.add_argument("--line-width", type=int, metavar="PX", help="box line width in pictures (default: follows "
                                                                "each box, within limits)")
    p.add_argument("--label-size", type=int, metavar="PX", help="label text size in pictures (default: follows "
                                                                "each box's height, within limits)")
    _mode_args(p)
    _engine_args(p)
    _int8_args(p)


def _engine_args(p: argparse.ArgumentParser) -> None:
    """Where ``predict`` runs the model: here, or on a Ray cluster's actors (``hrnetdet.integrations.ray``)."""
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="run the model here (local), or on a Ray cluster's actors (ray: pip install "
                        "'hrnetdet[ray]'; the input files must be readable at their absolute paths there)")
    p.add_argument("--ray-address", metavar="ADDR", help="with --engine ray: the cluster to join (host:6379, "
                   "ray://host:10001, auto; default: $RAY_ADDRESS, a Ray started on this machine, else a new one)")
    p.add_argument("--ray-actors", type=positive_int, metavar="N",
                   help="with --engine ray: model actors (default: one per CPU of the cluster, per GPU with --device cuda)")


def _ray_engine(args: argparse.Namespace) -> None:
    """``--engine ray``: the engine factory ``commands.run_predict`` calls (imported here: inference
    imports no integration), or one line saying what is missing; Ray's flags without it are refused."""
    if args.engine != "ray":
        for flag, value in (("--ray-address", args.ray_address), ("--ray-actors", args.ray_actors)):
            if value is not None:
                args.command_parser.error(f"argument {flag}: needs --engine ray")
        return
    try:
        from .integrations.ray import RayEngine
    except ImportError as e:
        raise SystemExit(f"hrnetdet predict: error: --engine ray: {e}") from None
    args.make_engine = RayEngine.from_args


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--checkpoint-path", type=existing_file, help="a reference .pth or hrnetdet .safetensors file")
    alias(p, "--checkpoint", "--checkpoint-path")
    p.add_argument("--format", required=True, choices=["torchscript", "onnx", "openvino"])
    p.add_argument("--out", type=output_folder, required=True, help="output folder")
    p.add_argument("--dynamic", action="store_true",
                   help="ONNX/OpenVINO graphs for any image size (default: the padded size of a 480x640 image)")
    p.add_argument("--half", action="store_true", help="OpenVINO: store the weights in float16")
    p.add_argument("--opset", type=positive_int, default=17, help="ONNX opset (17)")
    _int8_args(p)
    p.add_argument("--min-size", type=positive_int, help="test resize: shorter side (the model's default: 800)")
    _max_size_arg(p)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"a number above 0, got {text!r}")
    return value


def _serve_args(p: argparse.ArgumentParser) -> None:
    """``hrnetdet serve``: the model flags of ``predict`` (MODEL positional), the server's own."""
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP + "; with --pretrained or --checkpoint")
    p.add_argument("--checkpoint-path", type=existing_file, help="a .safetensors or reference .pth file")
    alias(p, "--checkpoint", "--checkpoint-path")
    p.add_argument("--pretrained", nargs="?", const=True, default=False, metavar="TAG",
                   help="the published COCO weights of MODEL (or of this tag)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (127.0.0.1: this machine only; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=int, default=8000, choices=range(0, 65536), metavar="PORT", help="port (8000)")
    p.add_argument("--max-batch-size", type=positive_int, default=1,
                   help="dynamic batching: up to this many queued requests run as one batch (1: none)")
    p.add_argument("--batch-timeout", type=positive_float, default=0.005, metavar="SECONDS",
                   help="how long a batch waits to fill (0.005; with --max-batch-size over 1)")
    p.add_argument("--workers", type=positive_int, default=1,
                   help="inference worker processes per device, each holding its own copy of the model "
                        "(1: one model in memory; the HTTP process holds none)")
    _device_arg(p)
    _backend_arg(p, "run the dense parts in this runtime (as predict --backend)")
    p.add_argument("--fast", action="store_true", help="the inference fast path (optimize_for_inference)")
    _int8_args(p)
    p.add_argument("--half", action="store_true", help="half precision: float16 on CUDA, bfloat16 on the CPU")
    p.add_argument("--max-upload-mb", type=positive_float, default=20.0, help="refuse (413) request bodies over this (20)")
    p.add_argument("--max-pixels", type=int, metavar="N",
                   help="refuse (413) images over N pixels, read from the header (default 64 million; 0: no limit)")
    p.add_argument("--score-thresh", type=float, help="default score threshold (the model's); requests may change it")
    p.add_argument("--max-det", type=int, metavar="N", help="default detections per image (the model's)")
    p.add_argument("--api-key", help="require this key (header X-API-Key) on every route but /health and the page; "
                                     "or set HRNETDET_API_KEY")
    p.add_argument("--min-size", type=positive_int, help="test resize: shorter side (the model's default: 800)")
    _max_size_arg(p)


COMMANDS: Dict[str, Command] = {
    "train": Command("train or fine-tune a detector on a COCO-format dataset (torchrun for DDP)",
                     _train_args, "hrnetdet.engine.commands:run_train"),
    "eval": Command("COCO bbox/segm AP of a detector on a COCO-format dataset",
                    _eval_args, "hrnetdet.engine.commands:run_eval"),
    "predict": Command("detect objects in images; writes COCO-results JSON and pictures",
                       _predict_args, "hrnetdet.inference.commands:run_predict"),
    "models": Command("list the architectures and weight tags", _models_args, "hrnetdet.zoo.commands:run_models",
                      uses_torch=False),
    "download": Command("fetch models' weights into the caches or a folder for offline use",
                        _download_args, "hrnetdet.zoo.commands:run_download"),
    "convert": Command("convert a reference (mmdetection) checkpoint to hrnetdet safetensors",
                       _convert_args, "hrnetdet.zoo.commands:run_convert"),
    "push": Command("publish a training run on the Hugging Face Hub with a generated model card",
                    _push_args, "hrnetdet.zoo.push:run_push"),
    "export": Command("export a model to TorchScript, ONNX or OpenVINO, checked against eager",
                      _export_args, "hrnetdet.inference.commands:run_export"),
    "serve": Command("serve a model over HTTP: POST /predict with dynamic batching, a web page at /",
                     _serve_args, "hrnetdet.serve.commands:run_serve"),
}

REMOTE_PREDICT = "hrnetdet.serve.commands:run_remote_predict"  # predict --server: a server's model

# Errors a user can fix (a missing or wrong file, an unknown name, bad input; CheckpointError is a
# ValueError; FloatingPointError is a diverged training run): one line, no traceback. Anything else is
# a bug and keeps its traceback.
USER_ERRORS = (OSError, ValueError, FloatingPointError)

LIBRARY_PHRASES = (("hrnetdet.list_models(pretrained=True)", "`hrnetdet models --pretrained`"),
                   ("hrnetdet.list_models()", "`hrnetdet models`"))


def _flags(parser: argparse.ArgumentParser) -> Dict[str, str]:
    """dest -> its flag (the first spelling: the current one), for the options of ``parser``."""
    return {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings and a.help != argparse.SUPPRESS}


def user_message(message: str, parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """A library error's message in the CLI's terms. A flag is its Python keyword spelt with dashes,
    so a keyword the message names (``checkpoint_path=``, or the setting it starts with) is written
    as its flag; a message about a value the user gave a flag is prefixed ``argument --flag:`` as
    argparse does."""
    for python, cli in LIBRARY_PHRASES:
        message = message.replace(python, cli)
    flags = _flags(parser)
    for dest, flag in flags.items():
        message = message.replace(f"{dest}=", f"{flag} ")
        if message.startswith(f"{dest} "):
            message = flag + message[len(dest):]
    if " --" in f" {message}":
        return message
    defaults = {a.dest: a.default for a in parser._actions}
    named = [(message.find(value), flag) for dest, flag in flags.items()
             for value in [getattr(args, dest, None)]
             if isinstance(value, str) and value != defaults.get(dest) and len(value) > 1 and value in message]
    return f"argument {min(named)[1]}: {message}" if named else message


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="hrnetdet", description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--version", action="version", version=f"hrnetdet {__version__}")
    common = Parser(add_help=False)
    common.add_argument("--threads", type=positive_int, metavar="N", help=THREADS_HELP)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error (or HRNETDET_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, parents=[common], help=command.help, description=command.help)
        p.set_defaults(command_parser=p)
        command.add_arguments(p)
    return parser


def without_internals(message: str) -> str:
    """A message as one line, without the memory addresses of the objects it names (``<... at 0x7f..>``)."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", " ".join(message.split()))


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as the CLI shows it: one line, without the source line Python echoes under it."""
    return f"hrnetdet: warning: {without_internals(str(message))}\n"


@contextlib.contextmanager
def cli_output(debug: bool) -> Iterator[None]:
    """Warnings on one line without their source line, and huggingface_hub's notes on each retry
    silenced (the error that follows says why it failed), unless --debug or HF_HUB_VERBOSITY is set."""
    formatwarning, warnings.formatwarning = warnings.formatwarning, one_line_warning
    quiet_hub = not debug and "HF_HUB_VERBOSITY" not in os.environ
    if quiet_hub:
        os.environ["HF_HUB_VERBOSITY"] = "error"  # read when huggingface_hub is imported
    try:
        yield
    finally:
        warnings.formatwarning = formatwarning
        if quiet_hub:
            del os.environ["HF_HUB_VERBOSITY"]


def _check_weights(args: argparse.Namespace, subparser: argparse.ArgumentParser) -> None:
    """A command that runs a model is told where its weights are, or (predict) a server to ask."""
    if getattr(args, "server", None):
        if args.model or args.checkpoint_path or args.pretrained:
            subparser.error("--server runs the server's model: leave out --model, --checkpoint-path and --pretrained")
        if args.engine != "local":
            subparser.error(f"--server and --engine {args.engine}: choose one")
        if args.int8:
            subparser.error("--int8: a server's model is quantized where it runs (hrnetdet serve --int8)")
    elif args.command == "predict" and not args.model:
        subparser.error("the following arguments are required: --model (or --server URL)")
    elif args.command in ("eval", "predict", "serve") and not (args.checkpoint_path or args.pretrained
                                                               or names_weights(args.model)):
        subparser.error("give --checkpoint-path PATH, --pretrained [TAG], or a --model that brings its weights "
                        "(NAME.tag, a saved or run folder, hf-hub:org/name)")


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    subparser = args.command_parser
    if unknown:  # refused by the command's parser, whose usage names the command
        subparser.error(f"unrecognized arguments: {' '.join(unknown)}")
    _check_weights(args, subparser)
    if args.command == "predict":
        _ray_engine(args)
    if COMMANDS[args.command].uses_torch:
        set_num_threads(args.threads)
    args.debug = args.debug or os.environ.get("HRNETDET_DEBUG", "") not in ("", "0")
    with cli_output(args.debug):
        return _run(args, subparser)


def _run(args: argparse.Namespace, subparser: argparse.ArgumentParser) -> int:
    try:
        model = getattr(args, "model", None)
        if model and os.path.isdir(model):
            args.model = saved_model_folder(model)
            if args.model != model:
                print(f"hrnetdet {args.command}: {model} is a training run: using {args.model}", file=sys.stderr)
        run_path = REMOTE_PREDICT if getattr(args, "server", None) else COMMANDS[args.command].run
        module, function = run_path.split(":")
        run = getattr(importlib.import_module(module), function)
        return int(run(args) or 0)
    except USER_ERRORS as e:
        if args.debug:
            raise
        message = user_message(without_internals(str(e)) or type(e).__name__, subparser, args)
        raise SystemExit(f"hrnetdet {args.command}: error: {message}") from None
    except KeyboardInterrupt:
        raise SystemExit(f"hrnetdet {args.command}: interrupted") from None


if __name__ == "__main__":
    sys.exit(main())
