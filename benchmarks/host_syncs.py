"""Where inference waits for the device: the operations that copy a value to the host (on CUDA each
one stalls the CPU until the GPU has caught up), counted per family with the PyTorch profiler and
attributed to the hrnetdet or torchvision line that calls them. Runs on the CPU: the count and the
call sites are the same on a GPU, only their cost differs.

    python benchmarks/host_syncs.py [--models ...] [--out benchmarks/host_syncs.md]
"""
import argparse
import os
import sys
from collections import Counter, defaultdict
from typing import Dict, List, Optional

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import build, images, write_report  # noqa: E402

import hrnetdet  # noqa: E402

# aten ops whose CUDA implementation reads device memory on the host: a scalar read, or an output
# whose size depends on the data.
SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero", "aten::equal")


def call_site(stack: List[str]) -> str:
    """The innermost frame in hrnetdet or torchvision's detection code."""
    for frame in stack:
        if ("hrnetdet/" in frame or "torchvision/" in frame) and "profiler" not in frame:
            path, _, rest = frame.partition("(")
            short = path.split("site-packages/")[-1].split("/work/")[-1]
            return f"{short}:{rest.split(')')[0]}"
    return "?"


def count_syncs(model: torch.nn.Module, imgs: List[torch.Tensor]) -> Dict[str, Counter]:
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        model(imgs)
    sites: Dict[str, Counter] = defaultdict(Counter)
    for event in prof.events():
        if event.name in SYNC_OPS and not any(e.name in SYNC_OPS for e in _parents(event)):
            stack = next((e.stack for e in (event, *_parents(event)) if e.stack), [])
            sites[event.name][call_site(stack)] += 1
    return sites


def _parents(event):
    p = event.cpu_parent
    while p is not None:
        yield p
        p = p.cpu_parent


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=hrnetdet.list_models("*_w18"))
    p.add_argument("--min-size", type=int, default=320)
    p.add_argument("--max-size", type=int, default=533)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "host_syncs.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    imgs = images(2)[:1]
    lines = ["# Host synchronisations per image", "",
             f"`python benchmarks/host_syncs.py {' '.join(argv if argv is not None else sys.argv[1:])}`: one "
             f"{args.min_size}-pixel image, random calibrated weights (100 detections), torch {torch.__version__}. "
             "Each row: an operation that reads device memory on the host, how often one inference calls "
             "it, and its most frequent call sites.", "",
             "| model | op | calls | call sites (calls) |", "|---|---|---:|---|"]
    for name in args.models:
        model = build(name, imgs, torch.device("cpu"), args.min_size, args.max_size)
        for op, sites in sorted(count_syncs(model, imgs).items()):
            top = ", ".join(f"`{s}` ({n})" for s, n in sites.most_common(4))
            lines.append(f"| {name} | {op.split('::')[1]} | {sum(sites.values())} | {top} |")
    write_report(args.out, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
