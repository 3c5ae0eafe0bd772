"""How fast could any fp32 runtime run a detector on this CPU? A lower bound on its time from the
model's multiply-accumulates and the best rates measured for its layers, as a share of eager's time.

    python benchmarks/arithmetic_bound.py --threads 1 2

One eager detection of a COCO-sized image (resized to 800x1199, padded to 800x1216; calibrated
weights, so 1,000 proposals and 100 detections) counts the MACs of every convolution and linear
layer. Each 3x3 convolution with as many output as input channels (HRNet's branches, the
256-channel neck, RPN, FCOS and mask convolutions: most of the arithmetic) is timed by shape in
OpenVINO, as a chain of four such layers with ReLUs, both direct and as Winograd F(4x4, 3x3) written
in graph operations (a quarter of the multiplications, plus transforms that are passes over memory).
The bound gives each of those layers the faster of its two rates and every other MAC the best direct
rate of all shapes; the ideal bound gives every MAC the best rate of all, Winograd's included. Neither
counts RoIAlign, NMS or any memory-bound step, so a runtime running the same layers in fp32 takes
longer than both. Eager's time is the best of three detections of the same image.
"""
import argparse
import collections
import copy
import os
import sys
import tempfile
import time
import warnings
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import build, images, keep_freed_memory, provenance, write_report  # noqa: E402  (benchmarks/run.py)

from hrnetdet.inference.runtime import require  # noqa: E402
from hrnetdet.inference.winograd import is_winograd_eligible, use_winograd  # noqa: E402

DEFAULT_MODELS = ["faster_rcnn_hrnetv2p_w18", "faster_rcnn_hrnetv2p_w40", "mask_rcnn_hrnetv2p_w18"]
Shape = Tuple[int, int, int, int]  # a square 3x3 convolution's input: batch, channels, height, width

def count_macs(model: nn.Module, image: torch.Tensor) -> Tuple[Dict[Shape, int], int]:
    """MACs of the square 3x3 stride-1 convolutions by input shape, and of every other convolution
    and linear layer, during one detection of ``image``."""
    square: Dict[Shape, int] = collections.Counter()
    other = [0]

    def hook(module, inputs, out):
        x = inputs[0]
        if isinstance(module, nn.Linear):
            other[0] += out.numel() * module.in_features
        elif isinstance(module, nn.ConvTranspose2d):
            other[0] += x.numel() * module.out_channels // module.groups * module.weight[0, 0].numel()
        elif is_winograd_eligible(module, min_channels=1) and module.in_channels == module.out_channels:
            square[tuple(x.shape)] += out.numel() * module.in_channels * 9
        else:
            other[0] += out.numel() * module.in_channels // module.groups * module.weight[0, 0].numel()

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))]
    try:
        with torch.no_grad():
            model([image])
    finally:
        for h in handles:
            h.remove()
    return dict(square), other[0]


def openvino_rate(shape: Shape, threads: int, winograd: bool) -> float:
    """GFLOP/s of OpenVINO (fp32) on four chained 3x3 convolutions of ``shape``, the best of five."""
    ov = require("openvino")
    torch.manual_seed(0)
    direct = nn.Sequential(*[m for _ in range(4) for m in (nn.Conv2d(shape[1], shape[1], 3, padding=1), nn.ReLU())])
    graph = copy.deepcopy(direct)
    if winograd:
        use_winograd(graph, min_channels=1)
    x = torch.randn(shape)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = os.path.join(tmp, "chain.onnx")
        torch.onnx.export(graph, (x,), path, dynamo=False, opset_version=17)
        compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                         "INFERENCE_NUM_THREADS": threads})
    request = compiled.create_infer_request()
    array = x.numpy()
    out = request.infer([array])[compiled.outputs[0]]
    with torch.no_grad():
        expected = direct(x).numpy()
    error = np.abs(out - expected).max() / np.abs(expected).max()
    if error > 1e-4:  # a rate is only worth quoting for the same function
        raise AssertionError(f"{shape} {'Winograd' if winograd else 'direct'}: relative error {error:.1e}")
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        request.infer([array])
        best = min(best, time.perf_counter() - t)
    macs = 4 * int(np.prod(shape)) * shape[1] * 9
    return 2 * macs / best / 1e9


def measure(name: str, threads: int, image: torch.Tensor, rates: Dict[Tuple[Shape, bool], float]) -> str:
    torch.set_num_threads(threads)
    model = build(name, [image], torch.device("cpu"), 800, 1333).eval()
    square, other = count_macs(model, image)
    with torch.inference_mode():
        model([image])
        times = []
        for _ in range(3):
            t = time.perf_counter()
            model([image])
            times.append(time.perf_counter() - t)
    eager = min(times)
    for shape in square:
        for winograd in (False, True):
            if (shape, winograd) not in rates:
                rates[(shape, winograd)] = openvino_rate(shape, threads, winograd)
                print(f"  {shape} {'Winograd' if winograd else 'direct'}: "
                      f"{rates[(shape, winograd)]:.0f} GFLOP/s", file=sys.stderr, flush=True)
    best = {s: max(rates[(s, False)], rates[(s, True)]) for s in square}
    peak_direct = max(rates[(s, False)] for s in square)
    bound = sum(2 * m / best[s] for s, m in square.items()) / 1e9 + 2 * other / peak_direct / 1e9
    total = sum(square.values()) + other
    ideal = 2 * total / max(best.values()) / 1e9
    return (f"| {name} | {threads} | {total / 1e9:.0f} | {100 * sum(square.values()) / total:.0f} % | "
            f"{peak_direct:.0f} / {max(best.values()):.0f} | {eager:.2f} | {bound:.2f} | {bound / eager:.2f} | "
            f"{ideal:.2f} | {ideal / eager:.2f} |")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    p.add_argument("--threads", nargs="+", type=int, default=[1])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                 "arithmetic_bound.md"))
    args = p.parse_args(argv)
    keep_freed_memory()
    image = images(1)[0]
    load_start = os.getloadavg()
    rows = []
    for threads in args.threads:
        rates: Dict[Tuple[Shape, bool], float] = {}
        for name in args.models:
            rows.append(measure(name, threads, image, rates))
            print(rows[-1], flush=True)
    import openvino
    lines = [
        "# How close a runtime can get: the fp32 arithmetic bound (CPU)", "",
        provenance(load_start, f"torch {torch.__version__}, OpenVINO {openvino.__version__}"), "",
        "GMAC: the convolution and linear layers' multiply-accumulates in one detection of an "
        "800x1216 input; square 3x3: the share in 3x3 convolutions with as many output as input "
        "channels. Rates: the best direct rate of OpenVINO over those layers' shapes / the best "
        "including Winograd F(4x4, 3x3). Bound: each square 3x3 layer at the faster of its shape's "
        "two rates, every other MAC at the best direct rate; ideal: every MAC at the best rate of all. "
        "Ratios are to eager's wall time.", "",
        "| model | threads | GMAC | square 3x3 | GFLOP/s direct / best | eager s | bound s | bound / eager "
        "| ideal s | ideal / eager |",
        "|---|---|---|---|---|---|---|---|---|---|", *rows, ""]
    write_report(args.out, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
