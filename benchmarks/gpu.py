"""GPU speed and memory: every family at W18 and Faster R-CNN at every width, in fp32 and half
precision, next to torchvision's ResNet-50-FPN detectors timed alternately in the same process, with
the reference's published V100 figures beside them.

    python benchmarks/gpu.py                              # CUDA: writes the GPU section of results.md
    python benchmarks/gpu.py --smoke --out /tmp/gpu.md    # CPU, tiny images: the whole path in seconds

Half precision is autocast (float16 on CUDA, bfloat16 on the CPU), the way ``hrnetdet.predict(...,
half=True)`` runs: convolutions and linear layers in half, box decoding, RoIAlign and NMS in float32
(class-wise NMS shifts boxes by up to ~80x their coordinates, which float16 cannot hold). The
*fast* variants add ``optimize_for_inference`` (batch norms folded, channels-last); ``--compile``
also captures the backbone and neck with ``torch.compile(mode="reduce-overhead")`` (CUDA graphs).
Weights are random but calibrated (every image carries 100 detections, as with trained weights).
The rest of results.md (the CPU tables of ``benchmarks/run.py``) is left as it is.
"""
import argparse
import copy
import datetime
import os
import platform
import re
import sys
from typing import Dict, List, Optional

import torch
import torchvision
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import base_name, bench_inference, bench_train, build, images  # noqa: E402

import hrnetdet  # noqa: E402
from hrnetdet.inference import optimize_for_inference  # noqa: E402
from hrnetdet.inference.predict import half_dtype  # noqa: E402

SECTION = "## GPU"
WIDTHS = ("faster_rcnn_hrnetv2p_w18", "faster_rcnn_hrnetv2p_w32", "faster_rcnn_hrnetv2p_w40",
          "faster_rcnn_hrnetv2p_w48")
TRAIN_MODELS = ("faster_rcnn_hrnetv2p_w18", "faster_rcnn_hrnetv2p_w32", "mask_rcnn_hrnetv2p_w18",
                "mask_rcnn_hrnetv2p_w32")
PEERS = ("fasterrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn", "fcos_resnet50_fpn")


def reference_figure(arch: str, key: str) -> Optional[float]:
    """The reference's published figure (V100 fps, training GB per GPU) for ``arch``, if any."""
    values = [c.metrics[key] for c in hrnetdet.get_arch_pretrained_cfgs(arch) if key in c.metrics]
    return max(values) if values else None


def compiled(model: nn.Module) -> nn.Module:
    """The fast path with the backbone and neck captured as CUDA graphs (one per input size)."""
    model = optimize_for_inference(copy.deepcopy(model))
    model.backbone = torch.compile(model.backbone, mode="reduce-overhead")
    return model


def update_section(path: str, text: str) -> None:
    """Replace the GPU section of ``path`` (up to the next top-level ``## `` heading that is not
    part of it) by ``text``, or append it; atomically."""
    old = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\b.*?(?=^## (?!GPU)|\Z)", re.S | re.M)
    new = pattern.sub(lambda _: text, old, count=1) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(new)
    os.replace(tmp, path)


def fmt(x: Optional[float], spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true",
                   help="CPU, 64-96 px images, one round: checks every path, measures nothing")
    p.add_argument("--device", default="cuda")
    p.add_argument("--rounds", type=int, default=10, help="timed rounds at batch 1 (batch 8: half)")
    p.add_argument("--batch", type=int, default=8, help="the throughput runs' batch size")
    p.add_argument("--train-iters", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="add the CUDA-graph-captured fast path")
    p.add_argument("--min-size", type=int, default=800)
    p.add_argument("--max-size", type=int, default=1333)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.md"))
    args = p.parse_args(argv)
    if args.smoke:
        args.device, args.rounds, args.train_iters, args.min_size, args.max_size = "cpu", 1, 1, 64, 96
        args.batch = 2
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py: no CUDA device; use --smoke for the CPU check")
    half = half_dtype(device)
    half_name = "fp16" if half == torch.float16 else "bf16"
    imgs = images(8)
    w18 = hrnetdet.list_models("*_w18")
    archs = w18 + [a for a in WIDTHS if a not in w18]
    peers, train_names = PEERS, TRAIN_MODELS + PEERS[:2]
    if args.smoke:  # one box and one mask model with their peers: every code path, a few seconds
        archs, peers = ["faster_rcnn_hrnetv2p_w18", "mask_rcnn_hrnetv2p_w18"], PEERS[:1]
        train_names = ("faster_rcnn_hrnetv2p_w18", PEERS[0])

    models: Dict[str, nn.Module] = {}
    for name in peers + tuple(archs):
        models[name] = build(name, imgs[:2], device, args.min_size, args.max_size)
        if args.smoke:  # 10 detections: mask pasting dominates a CPU run otherwise
            models[name].roi_heads.detections_per_img = 10
    fast = {f"{k} (fast)": optimize_for_inference(copy.deepcopy(m)) for k, m in models.items() if k in archs}
    if args.compile:
        fast.update({f"{k} (compiled)": compiled(m) for k, m in models.items()})
    batched = {k: m for k, m in models.items()
              if k in peers or k in ("faster_rcnn_hrnetv2p_w18", "mask_rcnn_hrnetv2p_w18")}
    rounds_batched = max(1, args.rounds // 2)
    res = {("fp32", 1): bench_inference(models, imgs, device, args.rounds, 1),
           (half_name, 1): bench_inference({**models, **fast}, imgs, device, args.rounds, 1, autocast=half),
           ("fp32", "batched"): bench_inference(batched, imgs, device, rounds_batched, args.batch),
           (half_name, "batched"): bench_inference(batched, imgs, device, rounds_batched, args.batch, autocast=half)}
    train = bench_train({k: models[k] for k in train_names}, imgs, device, args.train_iters, amp=True)

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    lines = [
        SECTION, "",
        f"`python benchmarks/gpu.py {' '.join(argv if argv is not None else sys.argv[1:])}` on "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {gpu}; torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}. Images 427x640 and 400x600 resized to {args.min_size} "
        f"(at most {args.max_size}); random calibrated weights, {10 if args.smoke else 100} detections per image; median of "
        f"{args.rounds} alternating rounds (batch {args.batch}: {rounds_batched}). {half_name}: autocast. V100: the "
        "reference's published fps (batch 1, fp32).", "",
        f"| model | fps fp32 | fps {half_name} | img/s fp32 b{args.batch} | img/s {half_name} b{args.batch} | V100 fps | {half_name} / V100 | peak MB {half_name} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key in list(models) + list(fast):
        base = base_name(key)
        f32 = res[("fp32", 1)].get(key)
        f16 = res[(half_name, 1)][key]
        bn = res[("fp32", "batched")].get(key)
        hn = res[(half_name, "batched")].get(key)
        v100 = reference_figure(base, "fps") if base in archs else None
        fps16 = 1 / f16["s_per_img"]
        lines.append(f"| {key} | {fmt(f32 and 1 / f32['s_per_img'])} | {fps16:.3g} | "
                     f"{fmt(bn and 1 / bn['s_per_img'])} | {fmt(hn and 1 / hn['s_per_img'])} | {fmt(v100)} | "
                     f"{fmt(v100 and fps16 / v100, '.2f')} | {f16['peak_mb']:.0f} |")
    lines += ["", f"### Training step, batch 2, AMP ({half_name})", "",
              "| model | s/iter | peak GB | reference GB/GPU | ratio |", "|---|---:|---:|---:|---:|"]
    for key, r in train.items():
        ref = reference_figure(key, "train_mem_gb") if key in archs else None
        gb = r["peak_mb"] / 1024
        lines.append(f"| {key} | {r['s_per_it']:.3f} | {gb:.2f} | {fmt(ref)} | {fmt(ref and gb / ref, '.2f')} |")
    half_batched = res[(half_name, "batched")]
    lines += ["", "### Targets", "",
              f"- W18 Faster R-CNN {half_name} batch {args.batch} / fasterrcnn_resnet50_fpn (target >= 1.0): "
              f"{half_batched['fasterrcnn_resnet50_fpn']['s_per_img'] / half_batched['faster_rcnn_hrnetv2p_w18']['s_per_img']:.2f}x"]
    for a in [a for a in hrnetdet.list_models("*_w18") if a in archs]:
        v100 = reference_figure(a, "fps")
        best = min(r["s_per_img"] for k, r in res[(half_name, 1)].items() if base_name(k) == a)
        if v100:
            lines.append(f"- {a} {half_name} batch 1: {1 / best:.1f} fps, {1 / best / v100:.2f}x the V100's "
                         f"{v100} (target >= 3x)")
    lines.append("")
    update_section(args.out, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
