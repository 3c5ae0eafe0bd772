"""Speed of hrnetdet (eager and each runtime backend) against mmdetection 3.3 on the parity harness's
models and images, with each variant's parity to the reference's own detections.

    python benchmarks/against_reference.py --models faster_rcnn_hrnetv2p_w18 mask_rcnn_hrnetv2p_w18 \
        [--artifacts /work/parity_artifacts] [--reference-python /work/parity_env/bin/python] [--threads 1]

mmdetection runs in its own venv (``tools/parity/time_reference.py``, a child process that times one
image per request), hrnetdet in this process, on the same harness images and the same
``checkpoint.pth``. Within each round every image runs through every variant in turn, the reference
included, so that load from other processes falls on all alike; the table gives the best (minimum)
over rounds of each variant's CPU seconds per image (summed over the images) and its ratios to
mmdetection's and to eager hrnetdet's. Both processes keep freed memory (``run.keep_freed_memory``),
so that neither eager PyTorch pays page faults for the other variants' allocations. Parity: the
share of the reference's top-100 that a variant matches (the harness's criteria, masks included; HTC
against the mean of its mask heads), over the images. Appends a markdown section to ``--out``.
"""
import argparse
import copy
import datetime
import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools", "parity"))
from compare import build_hrnetdet, match_to_reference, read_image_chw01  # noqa: E402

from hrnetdet.inference import optimize_for_inference  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from export import sweep  # noqa: E402  (benchmarks/export.py)
from run import keep_freed_memory, keep_freed_memory_env, provenance  # noqa: E402  (benchmarks/run.py)

DEFAULT_MODELS = ["faster_rcnn_hrnetv2p_w18", "mask_rcnn_hrnetv2p_w18"]


class Reference:
    """The mmdetection child: ``time(image file)`` -> (wall, CPU) seconds."""

    def __init__(self, python: str, artifacts: str, model: str, threads: int):
        env = {**os.environ, **keep_freed_memory_env(), "OMP_NUM_THREADS": str(threads)}
        self.proc = subprocess.Popen([python, os.path.join(ROOT, "tools", "parity", "time_reference.py"),
                                      "--artifacts", artifacts, "--model", model, "--threads", str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        for line in self.proc.stdout:
            if line.strip() == "ready":
                return
        raise RuntimeError(f"the reference child for {model} ended before it was ready (see its stderr)")

    def time(self, image: str) -> "tuple[float, float]":
        self.proc.stdin.write(image + "\n")
        self.proc.stdin.flush()
        out = json.loads(self.proc.stdout.readline())
        return out["wall"], out["cpu"]

    def close(self) -> None:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def variants(name: str, checkpoint: str, backends: List[str], cache_dir: str) -> Dict[str, torch.nn.Module]:
    eager = build_hrnetdet(name, checkpoint).eval()
    out = {"hrnetdet eager": eager}
    for backend in backends:
        out[f"hrnetdet {backend}"] = optimize_for_inference(copy.deepcopy(eager), backend=backend, cache_dir=cache_dir)
    return out


def bench(name: str, args: argparse.Namespace, threads: int, cache_dir: str) -> Dict[str, dict]:
    mdir = os.path.join(args.artifacts, name)
    refs = torch.load(os.path.join(mdir, "reference.pt"), map_location="cpu", weights_only=False)
    files = sorted(f for f, r in refs.items() if isinstance(r, dict) and "boxes" in r)
    imgs = {f: read_image_chw01(os.path.join(args.artifacts, "images", f)) for f in files}
    models = variants(name, os.path.join(mdir, "checkpoint.pth"), args.backends, cache_dir)
    reference = Reference(args.reference_python, args.artifacts, name, threads)
    keys = ["mmdetection 3.3", *models]
    cpu: Dict[str, List[float]] = {k: [] for k in keys}
    wall: Dict[str, List[float]] = {k: [] for k in keys}
    matched = {k: [0, 0] for k in models}
    try:
        with torch.inference_mode():
            for r in range(args.rounds + 1):  # round 0 warms hrnetdet up and measures parity
                totals = {k: [0.0, 0.0] for k in keys}
                for f in files:
                    for k in keys:
                        if k == "mmdetection 3.3":
                            t, c = reference.time(f)
                        else:
                            t, c = time.perf_counter(), time.process_time()
                            out = models[k]([imgs[f]])[0]
                            t, c = time.perf_counter() - t, time.process_time() - c
                            if r == 0:
                                st = match_to_reference(name, refs[f], out)
                                matched[k][0] += st["n_matched"]
                                matched[k][1] += st["n_ref"]
                        totals[k][0] += t
                        totals[k][1] += c
                if r > 0:
                    for k in keys:
                        wall[k].append(totals[k][0] / len(files))
                        cpu[k].append(totals[k][1] / len(files))
                    print(f"  round {r}: " + ", ".join(f"{k} {cpu[k][-1]:.2f} s" for k in keys), file=sys.stderr,
                          flush=True)
    finally:
        reference.close()
    ref_cpu, eager_cpu = min(cpu[keys[0]]), min(cpu["hrnetdet eager"])
    return {k: {"cpu": min(cpu[k]), "wall": min(wall[k]),
                "vs_ref": min(cpu[k]) / ref_cpu, "vs_eager": min(cpu[k]) / eager_cpu,
                "parity": (matched[k][0] / max(matched[k][1], 1)) if k in matched else None} for k in keys}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    p.add_argument("--artifacts", default="/work/parity_artifacts")
    p.add_argument("--reference-python", default="/work/parity_env/bin/python")
    p.add_argument("--backends", nargs="+", default=["onnxruntime", "openvino"])
    p.add_argument("--threads", nargs="+", type=int, default=[1])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "against_reference.md"))
    args = p.parse_args(argv)
    keep_freed_memory()
    load_start = os.getloadavg()

    def measure(name: str, threads: int, cache_dir: str) -> List[str]:
        rows = []
        for k, v in bench(name, args, threads, cache_dir).items():
            share = "reference" if v["parity"] is None else f"{100 * v['parity']:.1f} %"
            rows.append(f"| {name} | {threads} | {k} | {v['cpu']:.2f} | {v['wall']:.2f} | {v['vs_ref']:.2f} "
                        f"| {v['vs_eager']:.2f} | {share} |")
        return rows

    rows = sweep(args.threads, args.models, measure)
    lines = [
        f"## {datetime.date.today()}", "",
        provenance(load_start, f"hrnetdet's torch {torch.__version__}") + f" Best of {args.rounds} rounds of "
        "the CPU seconds per image, averaged over the harness's six images (wall seconds beside it).", "",
        "| model | threads | variant | CPU s/img | wall s/img | ratio to mmdetection | ratio to eager | "
        "parity to mmdetection |", "|---|---|---|---|---|---|---|---|", *rows, ""]
    with open(args.out, "a") as f:
        f.write("\n".join(lines) + "\n")
    print(f"appended to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
