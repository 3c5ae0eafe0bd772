"""Prediction's overheads and scaling, each against a peer measured in the same process or run:

- the input-contract checks (one min/max reduction per image) against the model's forward pass;
- the peak memory of ``hrnetdet predict`` over 100 and over 1,000 generated 640x480 images (it
  must stay flat: results go to disk per image);
- throughput of ``hrnetdet predict`` with 2 decode workers against 0 on the same folder, of the
  640x480 images and of phone-sized 4032x3024 photos (``--no-draw``: decoding is the main cost).

    python benchmarks/predict.py [--images 1000] [--min-size 128] [--out benchmarks/predict.md]

W18 Faster R-CNN with random weights; a small ``--min-size`` keeps the run short (the point is the
flatness and the ratios, not the absolute speed).
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

import hrnetdet
from hrnetdet.zoo.checkpoint import save_pretrained

ARCH = "faster_rcnn_hrnetv2p_w18"
# Runs the CLI in a child and prints its own peak resident memory and its resident memory once the
# run is over (the main process: the one that would hold results; decode workers are separate
# processes of constant size). Loading the model sets the peak; the end RSS shows any growth.
CHILD = ("import resource, sys; from hrnetdet.cli import main; rc = main(sys.argv[1:]); "
         "print('peak_rss_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); "
         "print('end_rss_kib', int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize() // 1024); "
         "sys.exit(rc)")


def check_cost(repeats: int = 3) -> str:
    """Time of the transform's checks on a 480x640 image against the full forward pass at the
    model's default size (800), interleaved so that load falls on both alike."""
    torch.manual_seed(0)
    model = hrnetdet.create_model(ARCH).eval()
    image = torch.rand(3, 480, 640)
    checks, forwards = [], []
    with torch.no_grad():
        model([image])
        for _ in range(repeats):
            t = time.perf_counter()
            for _ in range(20):
                model.transform.check_images([image])
            checks.append((time.perf_counter() - t) / 20)
            t = time.perf_counter()
            model([image])
            forwards.append(time.perf_counter() - t)
    check, forward = min(checks), min(forwards)
    return (f"| input checks, 480x640 image | {check * 1e3:.2f} ms | forward pass {forward * 1e3:.0f} ms "
            f"| {100 * check / forward:.4f}% |")


def make_images(folder: str, n: int, block: int = 40) -> None:
    """``n`` JPEGs of 12 x 16 blocks of ``block`` pixels (40: 480x640; 252: 3024x4032)."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    for i in range(n):
        path = os.path.join(folder, f"{i:05d}.jpg")
        if not os.path.exists(path):
            image = np.kron(np.roll(base, i, axis=1), np.ones((block, block, 1), dtype=np.uint8))
            Image.fromarray(image).save(path, quality=90)


def run_cli(folder: str, out: str, checkpoint: str, workers: int, min_size: int, *extra: str
            ) -> "tuple[float, int, int]":
    cmd = [sys.executable, "-c", CHILD, "predict", folder, "--model", ARCH, "--checkpoint", checkpoint,
           "--out", out, "--min-size", str(min_size), "--max-size", str(max(min_size * 2, 64)),
           "--workers", str(workers), *extra]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - t
    kib = {k: int(v) for k, v in (line.split() for line in proc.stdout.splitlines() if "_rss_kib " in line)}
    return seconds, kib["peak_rss_kib"], kib["end_rss_kib"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--small", type=int, default=100)
    parser.add_argument("--photos", type=int, default=40, help="4032x3024 photos for the second throughput row")
    parser.add_argument("--min-size", type=int, default=128)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "predict.md"))
    parser.add_argument("--no-check-cost", action="store_true", help="skip the (slow, 800-px) check-cost timing")
    args = parser.parse_args()
    rows = ["| what | measured | peer | ratio |", "|---|---|---|---|"]
    if not args.no_check_cost:
        rows.append(check_cost())
        print(rows[-1], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(hrnetdet.create_model(ARCH), tmp)
        checkpoint = os.path.join(tmp, "model.safetensors")
        small, large = os.path.join(tmp, "small"), os.path.join(tmp, "large")
        os.makedirs(small)
        os.makedirs(large)
        make_images(small, args.small)
        make_images(large, args.images)
        t0, _, _ = run_cli(small, os.path.join(tmp, "w0"), checkpoint, 0, args.min_size)
        t2, peak_small, end_small = run_cli(small, os.path.join(tmp, "w2"), checkpoint, 2, args.min_size)
        rows.append(f"| throughput, {args.small} images, 2 decode workers | {args.small / t2:.2f} img/s "
                    f"| 0 workers: {args.small / t0:.2f} img/s | {t0 / t2:.2f}x |")
        print(rows[-1], flush=True)
        photos = os.path.join(tmp, "photos")
        os.makedirs(photos)
        make_images(photos, args.photos, block=252)
        p0, _, _ = run_cli(photos, os.path.join(tmp, "p0"), checkpoint, 0, args.min_size, "--no-draw")
        p2, _, _ = run_cli(photos, os.path.join(tmp, "p2"), checkpoint, 2, args.min_size, "--no-draw")
        rows.append(f"| throughput, {args.photos} 4032x3024 photos, `--no-draw`, 2 decode workers "
                    f"| {args.photos / p2:.2f} img/s | 0 workers: {args.photos / p0:.2f} img/s | {p0 / p2:.2f}x |")
        print(rows[-1], flush=True)
        _, peak_large, end_large = run_cli(large, os.path.join(tmp, "big"), checkpoint, 2, args.min_size)
        rows.append(f"| peak memory of `hrnetdet predict`, {args.images} images | {peak_large / 1024:.0f} MiB "
                    f"| {args.small} images: {peak_small / 1024:.0f} MiB | {peak_large / peak_small:.3f}x |")
        rows.append(f"| resident memory at the end of the run, {args.images} images | {end_large / 1024:.0f} MiB "
                    f"| {args.small} images: {end_small / 1024:.0f} MiB | {end_large / end_small:.3f}x |")
        print("\n".join(rows[-2:]), flush=True)
    note = (f"\n{ARCH}, random weights, 640x480 JPEGs, --min-size {args.min_size}; torch {torch.__version__}, "
            f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end.\n")
    with open(args.out, "w") as f:
        f.write("\n".join(rows) + "\n" + note)
    print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
