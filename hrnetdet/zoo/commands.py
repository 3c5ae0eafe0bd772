"""``hrnetdet models``, ``download`` and ``convert`` (their arguments are in ``hrnetdet/cli.py``).
``models`` reads the registry only, without torch; the others import what they need when they run."""
import argparse
import os
from typing import List

from .records import arch_name
from .registry import get_arch_pretrained_cfgs, get_family, get_pretrained_cfg, list_models


def run_models(args: argparse.Namespace) -> int:
    for name in list_models(args.pattern, pretrained=args.pretrained):
        if args.pretrained:
            print(name)
            continue
        family, width = get_family(name)
        tags = ",".join(c.tag for c in get_arch_pretrained_cfgs(name)) or "-"
        print(f"{name:34s} {family.title:20s} W{width:<3d} tags: {tags}")
    return 0


def run_download(args: argparse.Namespace) -> int:
    from .hub import backbone_weights_file, fetch_pretrained
    cache_dir = os.path.join(args.dir, "hub") if args.dir else None
    names: List[str] = []
    for n in args.names:
        names += list_models(n, pretrained=True) if (not args.backbone and "*" in n) else [n]
    for name in names:
        if args.backbone:
            path = backbone_weights_file(name, 0, cache_dir=cache_dir)
        else:
            cfg = get_pretrained_cfg(name)
            if cfg is None:
                raise ValueError(f"{name} has no published weights; `hrnetdet models --pretrained` lists them")
            path = fetch_pretrained(cfg, home=args.dir, cache_dir=cache_dir)
        print(f"{name}: {path}")
    if args.dir:
        print(f"Copy {args.dir} to the offline machine and set HRNETDET_HOME={args.dir} HF_HOME={args.dir} "
              f"HF_HUB_OFFLINE=1 (use the copy's path).")
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from .checkpoint import WEIGHTS_FILE, read_checkpoint, save_pretrained
    from .factory import create_model
    ckpt = read_checkpoint(args.checkpoint)
    arch = args.model or arch_name(ckpt.family, ckpt.width)
    model = create_model(arch, checkpoint_path=args.checkpoint)
    save_pretrained(model, args.out, {"source": os.path.basename(args.checkpoint)})
    print(f"wrote {os.path.join(args.out, WEIGHTS_FILE)} and config.json ({arch}, {len(model.categories)} classes)")
    return 0
