"""Peak memory of sliced Mask R-CNN (HRNetV2p-W18) on one 2400x1600 image with 1000+ detections:
hrnetdet's ``predict(slice=512, mask_format="rle")`` against SAHI's ``get_sliced_prediction`` with
the same model, image and tiles.

    OMP_NUM_THREADS=1 python benchmarks/slicing_memory.py [--skip-sahi]    # ~10 min, one thread

The image is a generated scene (``benchmarks/slicing.py``'s ``draw_scene``: 300 shapes 10-40 px
across on a noisy background, seed 0). The model has random weights calibrated on a crop of it
(``tools/calibrate.py``), and keeps up to ``--detections`` (80) detections per tile at score
threshold 0: untrained, it scores every box, so every tile carries the full count and the merged
image holds 1000+ detections (the load that made the old full-image float masks 18 GB). Tiles:
512x512, overlap 0.2 (24 tiles), plus one pass over the whole image; merged by NMS at IoU 0.5 (SAHI:
postprocess "NMS", metric "IOU", 0.5, class-wise). SAHI runs the model through its torchvision
wrapper (``TorchVisionDetectionModel`` with ``image_size`` = the tile side and the model's categories
as its mapping), which pastes each tile's masks at tile size and keeps them as polygons; SAHI
stops at a mask without a polygon, so detections whose mask has none are dropped for it first.

Each tool runs in its own fresh process (peak RSS cannot be reset within one); its figure is the
peak RSS of the process and that peak minus the RSS just before inference (model resident).
Writes benchmarks/slicing_memory.md.
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
WIDTH, HEIGHT, OBJECTS, SEED = 2400, 1600, 300, 0
SLICE, OVERLAP, IOU = 512, 0.2, 0.5


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(key + ":"))  # kB


def rss_mb() -> float:
    return _status_mb("VmRSS")


def peak_mb() -> float:
    """This process's own peak RSS (getrusage's ru_maxrss would keep the parent's across exec)."""
    return _status_mb("VmHWM")


def scene() -> np.ndarray:
    """The HWC uint8 test image."""
    from slicing import draw_scene  # benchmarks/slicing.py

    image, _ = draw_scene(np.random.default_rng(SEED), WIDTH, HEIGHT, OBJECTS)
    return np.array(image)


def build(image: torch.Tensor, detections: int) -> torch.nn.Module:
    """A W18 Mask R-CNN at test scale SLICE (scale 1 on the tiles), calibrated on the image's first tile."""
    import hrnetdet

    sys.path.insert(0, os.path.join(HERE, "..", "tools"))
    from calibrate import calibrate

    torch.manual_seed(0)
    model = hrnetdet.create_model("mask_rcnn_hrnetv2p_w18", min_size=SLICE, max_size=SLICE,
                                  box_detections_per_img=detections)
    return calibrate(model, [image[:, :SLICE, :SLICE]]).eval()


def run_hrnetdet(model: torch.nn.Module, pixels: np.ndarray) -> int:
    import hrnetdet

    result = hrnetdet.predict(model, pixels, score_thresh=0.0, slice=SLICE, overlap=OVERLAP, mask_format="rle")
    return len(result["boxes"])


def run_sahi(model: torch.nn.Module, pixels: np.ndarray) -> int:
    from sahi.models.torchvision import TorchVisionDetectionModel
    from sahi.predict import get_sliced_prediction
    from sahi.utils.cv import get_bbox_from_coco_segmentation, get_coco_segmentation_from_bool_mask

    from hrnetdet.inference.thresholds import score_threshold

    class WithPolygons(TorchVisionDetectionModel):
        """SAHI stops at a detection whose mask has no polygon ("Invalid segmentation mask."),
        which an untrained model gives often: those are dropped before SAHI reads the result."""

        def perform_inference(self, image: np.ndarray, image_size=None) -> None:
            super().perform_inference(image, image_size)
            pred = self._original_predictions[0]
            masks = (pred["masks"] > self.mask_threshold).numpy()
            keep = torch.tensor([get_bbox_from_coco_segmentation(get_coco_segmentation_from_bool_mask(m[0]))
                                 is not None for m in masks], dtype=torch.bool)
            self._original_predictions = [{k: v[keep] for k, v in pred.items()}]

    mapping = {str(i + 1): name for i, name in enumerate(model.categories)}
    wrapped = WithPolygons(model=model, confidence_threshold=0.0, image_size=SLICE,
                                        category_mapping=mapping, device="cpu", load_at_init=True)
    with score_threshold(model, 0.0):
        result = get_sliced_prediction(pixels, wrapped, slice_height=SLICE, slice_width=SLICE,
                                       overlap_height_ratio=OVERLAP, overlap_width_ratio=OVERLAP,
                                       perform_standard_pred=True, postprocess_type="NMS",
                                       postprocess_match_metric="IOU", postprocess_match_threshold=IOU,
                                       verbose=0)
    return len(result.object_prediction_list)


def child(tool: str, detections: int) -> None:
    """One tool's run in this (fresh) process; prints its figures as one JSON line."""
    torch.set_num_threads(1)
    pixels = scene()
    model = build(torch.from_numpy(pixels).permute(2, 0, 1).float().div(255), detections)
    before = rss_mb()
    start = time.perf_counter()
    count = {"hrnetdet": run_hrnetdet, "sahi": run_sahi}[tool](model, pixels)
    seconds = time.perf_counter() - start
    print(json.dumps({"tool": tool, "detections": count, "seconds": round(seconds, 1),
                      "peak_mb": round(peak_mb()), "inference_mb": round(peak_mb() - before)}), flush=True)


def measure(tool: str, detections: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", tool,
                           "--detections", str(detections)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return {"tool": tool, "error": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]}
    row = json.loads(done.stdout.strip().splitlines()[-1])
    print(row, flush=True)
    return row


def versions(tools) -> str:
    import torchvision

    parts = [f"torch {torch.__version__}", f"torchvision {torchvision.__version__}"]
    if "sahi" in tools:
        import sahi
        parts.append(f"sahi {sahi.__version__}")
    return ", ".join(parts)


def write_table(rows, detections: int, tools, path: str) -> None:
    lines = ["# Sliced Mask R-CNN: peak memory on one 2400x1600 image", "",
             f"`OMP_NUM_THREADS=1 python benchmarks/slicing_memory.py`, {datetime.date.today()}, "
             f"{platform.machine()} CPU, one thread ({versions(tools)}). Mask R-CNN HRNetV2p-W18, random "
             f"weights calibrated, up to {detections} detections per pass at score threshold 0; "
             f"{SLICE}x{SLICE} tiles, overlap {OVERLAP}, plus the whole image; NMS at IoU {IOU}. "
             "Each tool in a fresh process; inference memory = peak RSS minus the RSS before inference "
             "(see the script's docstring).", "",
             "| tool | detections | peak RSS (MB) | inference memory (MB) | seconds |", "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['tool']} | failed: {r['error']} | | | |")
        else:
            lines.append(f"| {r['tool']} | {r['detections']} | {r['peak_mb']} | {r['inference_mb']} | "
                         f"{r['seconds']} |")
    ours = next((r for r in rows if r["tool"] == "hrnetdet" and "error" not in r), None)
    if ours is not None:
        old = ours["detections"] * HEIGHT * WIDTH * 4 / 2 ** 20
        lines += ["", f"Before this change, merging pasted every merged detection into one detections x H x W "
                  f"float32 buffer: {old:.0f} MB for these {ours['detections']} detections alone, whatever "
                  "the mask format (not run here: the issue's run on a 2400x1600 image was OOM-killed at 22 GB). "
                  "Seconds are wall time on a machine shared with other jobs."]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detections", type=int, default=80, help="detections per tile and pass")
    parser.add_argument("--skip-sahi", action="store_true")
    parser.add_argument("--child", choices=["hrnetdet", "sahi"], help=argparse.SUPPRESS)
    parser.add_argument("--out", default=os.path.join(HERE, "slicing_memory.md"))
    args = parser.parse_args()
    if args.child:
        child(args.child, args.detections)
        return 0
    tools = ["hrnetdet"] + ([] if args.skip_sahi else ["sahi"])
    rows = [measure(tool, args.detections) for tool in tools]
    write_table(rows, args.detections, tools, args.out)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
