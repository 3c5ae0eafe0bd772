"""Speed and parity of the runtime backends (onnxruntime, OpenVINO) against eager hrnetdet.

    python benchmarks/export.py                                   # the default set, 1 thread
    python benchmarks/export.py --threads 1 2 --models faster_rcnn_hrnetv2p_w18 --rounds 5

Every variant of a model runs in one process on the same COCO-sized images (resized to
800x1199/800x1200, padded to 800x1216), alternating variant by variant within each round after a
warm-up round, so that load from other processes falls on all alike; the table gives the best
(the minimum) over rounds of each variant's time per image and its ratio to eager's best. The minimum,
because eager PyTorch's time drifts by up to 30 % from round to round with the state of the process's
heap, the runtimes' by a few percent. The process keeps freed memory (``keep_freed_memory``), so that
no variant pays for fresh pages because of another's allocations. Weights are random
but calibrated (every image carries 100 detections). Parity: the share of eager's detections a
variant matches (``match_detections``' criteria, masks included), over the images. The machine's
load average is recorded at the start and the end. Writes markdown (``--out``).
"""
import argparse
import copy
import os
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import build, images, keep_freed_memory, provenance, write_report  # noqa: E402  (benchmarks/run.py)

from hrnetdet.inference import match_detections, optimize_for_inference  # noqa: E402

DEFAULT_MODELS = ["faster_rcnn_hrnetv2p_w18", "faster_rcnn_hrnetv2p_w40", "mask_rcnn_hrnetv2p_w18",
                  "cascade_rcnn_hrnetv2p_w18", "cascade_mask_rcnn_hrnetv2p_w18", "htc_hrnetv2p_w18",
                  "fcos_hrnetv2p_w18"]


def variants(name: str, imgs: List[torch.Tensor], backends: List[str], cache_dir: str, fast_path: bool
             ) -> Dict[str, torch.nn.Module]:
    eager = build(name, imgs[:1], torch.device("cpu"), 800, 1333)
    out = {"eager": eager}
    if fast_path:
        out["eager fast path"] = optimize_for_inference(copy.deepcopy(eager))
    for backend in backends:
        out[backend] = optimize_for_inference(copy.deepcopy(eager), backend=backend, cache_dir=cache_dir)
    return out


def bench(models: Dict[str, torch.nn.Module], imgs: List[torch.Tensor], rounds: int) -> Dict[str, dict]:
    """Best wall and CPU (process) seconds per image, and parity against the first model."""
    wall: Dict[str, List[float]] = {k: [] for k in models}
    cpu: Dict[str, List[float]] = {k: [] for k in models}
    system: Dict[str, List[float]] = {k: [] for k in models}
    matched: Dict[str, List[int]] = {k: [] for k in models}
    n_ref = 0
    with torch.inference_mode():
        for r in range(rounds + 1):
            x = imgs[r % len(imgs)]
            ref = None
            for k, model in models.items():
                t, c, kernel = time.perf_counter(), time.process_time(), os.times().system
                out = model([x])[0]
                t, c, kernel = time.perf_counter() - t, time.process_time() - c, os.times().system - kernel
                ref = out if ref is None else ref
                if r < len(imgs):  # parity once per image
                    matched[k].append(match_detections(ref, out)["n_matched"])
                    n_ref += len(ref["scores"]) if k == "eager" else 0
                if r > 0:
                    wall[k].append(t)
                    cpu[k].append(c)
                    system[k].append(kernel)
                    print(f"  round {r} {k}: {t:.2f} s wall, {c:.2f} s CPU ({kernel:.2f} s system)", file=sys.stderr,
                          flush=True)
    base, base_wall = min(cpu["eager"]), min(wall["eager"])
    user = {k: [c - s for c, s in zip(cpu[k], system[k])] for k in models}
    return {k: {"wall": min(wall[k]), "cpu": min(cpu[k]), "user": min(user[k]),
                "user_ratio": min(user[k]) / min(user["eager"]),
                "ratio": min(cpu[k]) / base, "wall_ratio": min(wall[k]) / base_wall,
                "matched": sum(matched[k]) / max(n_ref, 1)}
            for k in models}


def sweep(thread_counts: List[int], models: List[str], measure: Callable[[str, int, str], List[str]]) -> List[str]:
    """The table rows ``measure(model, threads, cache_dir)`` gives for every thread count and model,
    printed as they come; the backends' export cache lives as long as the sweep."""
    rows: List[str] = []
    with tempfile.TemporaryDirectory() as cache_dir:
        for threads in thread_counts:
            torch.set_num_threads(threads)
            for name in models:
                print(f"{name}, {threads} thread(s)", file=sys.stderr, flush=True)
                for row in measure(name, threads, cache_dir):
                    rows.append(row)
                    print(row, flush=True)
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    p.add_argument("--backends", nargs="+", default=["onnxruntime", "openvino"])
    p.add_argument("--threads", nargs="+", type=int, default=[1])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--fast-path", action="store_true", help="also time eager with the torch fast path")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "export_results.md"))
    args = p.parse_args(argv)
    keep_freed_memory()
    imgs = images(2)
    load_start = os.getloadavg()

    def measure(name: str, threads: int, cache_dir: str) -> List[str]:
        res = bench(variants(name, imgs, args.backends, cache_dir, args.fast_path), imgs, args.rounds)
        return [f"| {name} | {threads} | {k} | {v['cpu']:.2f} | {v['user']:.2f} | {v['wall']:.2f} "
                f"| {v['ratio']:.2f} | {v['user_ratio']:.2f} | {v['wall_ratio']:.2f} | {100 * v['matched']:.1f} % |"
                for k, v in res.items()]

    rows = sweep(args.threads, args.models, measure)
    import onnxruntime
    import openvino
    lines = [
        "# Runtime backends against eager PyTorch (CPU)", "",
        provenance(load_start, f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
                               f"OpenVINO {openvino.__version__}"), "",
        f"Best of {args.rounds} alternating rounds (after a warm-up) of the CPU time of the process per "
        "image, of its user (computation) part, and of wall time (on a loaded machine wall time includes "
        "waiting for a core). Ratios to eager's: CPU time (what the process paid, the kernel's page faults "
        "included), user time (computation only: the figure for one thread) and wall time (the figure for "
        "several threads on an idle machine). Parity: share of eager's detections matched (box IoU >= "
        "0.98, score within 0.01, mask IoU >= 0.9) over the two images.", "",
        "| model | threads | variant | CPU s/img | user s/img | wall s/img | CPU ratio | user ratio | wall ratio "
        "| parity |", "|---|---|---|---|---|---|---|---|---|---|", *rows, ""]
    write_report(args.out, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
