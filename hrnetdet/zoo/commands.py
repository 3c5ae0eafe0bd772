"""``hrnetdet models`` and ``hrnetdet convert``."""
import argparse
import os

from .checkpoint import WEIGHTS_FILE, read_checkpoint, save_pretrained
from .factory import create_model
from .records import arch_name
from .registry import get_arch_pretrained_cfgs, get_family, list_models


def _models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("pattern", nargs="?", default="", help="wildcard filter, e.g. '*w32*'")
    p.add_argument("--pretrained", action="store_true", help="list arch.tag names with published weights")


def _models_run(args: argparse.Namespace) -> int:
    for name in list_models(args.pattern, pretrained=args.pretrained):
        if args.pretrained:
            print(name)
            continue
        family, width = get_family(name)
        tags = ",".join(c.tag for c in get_arch_pretrained_cfgs(name)) or "-"
        print(f"{name:34s} {family.title:20s} W{width:<3d} tags: {tags}")
    return 0


def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a reference (mmdetection) .pth checkpoint")
    p.add_argument("--model", help="architecture name; inferred from the checkpoint when omitted")
    p.add_argument("--out", required=True, help="output folder for model.safetensors and config.json")


def _convert_run(args: argparse.Namespace) -> int:
    ckpt = read_checkpoint(args.checkpoint)
    arch = args.model or arch_name(ckpt.family, ckpt.width)
    model = create_model(arch, checkpoint_path=args.checkpoint)
    save_pretrained(model, args.out, {"source": os.path.basename(args.checkpoint)})
    print(f"wrote {os.path.join(args.out, WEIGHTS_FILE)} and config.json ({arch}, {len(model.categories)} classes)")
    return 0


COMMANDS = {
    "models": {"help": "list the architectures and weight tags", "add_arguments": _models_args,
               "run": _models_run},
    "convert": {"help": "convert a reference (mmdetection) checkpoint to hrnetdet safetensors",
                "add_arguments": _convert_args, "run": _convert_run},
}
