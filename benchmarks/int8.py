"""int8 against fp32 on the CPU: the accuracy of trained models, and the speed at 800x1216.

    python benchmarks/int8.py accuracy --runs /work/int8_runs --models demo_frcnn   # AP, fp32 vs int8
    python benchmarks/int8.py speed --threads 1 2 --stages                          # s/img and per stage

accuracy: the trained models under ``--runs``: ``demo_frcnn`` (``python -m hrnetdet.demo --out
RUNS/demo_frcnn``), ``demo_mask`` (a Mask R-CNN W18 trained the demo's way on the demo's data, in
RUNS/demo_mask/run) and ``slicing`` (``python benchmarks/slicing.py train --out RUNS/slicing``).
Each is scored with pycocotools on the same held-out images: eager fp32 first, then each backend
in fp32 and in int8 calibrated on 32, 128 and 512 images. The held-out images (``--heldout``, 400)
are generated apart (RUNS/heldout/) by the generator of the model's training images, with its
settings and a seed no training or calibration set uses (1002 for the demo's images, 1001 for
the slicing model's 128x128 tiles: its 3000x2000 scenes take minutes per variant here). Each AP
change comes with its standard error, from the change on 8 disjoint chunks of those images.
Calibration images come from the model's training split only (a seeded shuffle, so the smaller
sets are prefixes of the larger); a split smaller than the set is topped up with images generated
apart, by the same generator with the same settings and another seed (RUNS/calibration/).

speed: calibrated random weights at 800x1216, as benchmarks/export.py measures the fp32 backends
(its ``variants`` and ``bench``: alternating rounds, best of each), with the int8 variants beside
them in the same process. ``--stages`` also times each variant's stages (preprocessing,
backbone+neck, RPN with its dense head apart, RoI heads with RoIAlign and the dense heads apart,
and the rest: postprocessing) with forward hooks, best of ``--rounds`` detections.

Every section records the CPU's features (the int8 instructions), the load average, and how many
cores other processes kept busy meanwhile. Tables go into benchmarks/int8.md, each between its own
markers so that a rerun replaces only its section.
"""
import argparse
import copy
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import slicing  # noqa: E402  (benchmarks/slicing.py)
from export import bench, sweep, variants  # noqa: E402  (benchmarks/export.py)
from run import images, keep_freed_memory, provenance  # noqa: E402  (benchmarks/run.py)

from hrnetdet import demo  # noqa: E402
from hrnetdet.data import CocoDetection, make_shapes_dataset  # noqa: E402
from hrnetdet.engine.evaluate import coco_predictions, default_iou_types, run_cocoeval, score  # noqa: E402
from hrnetdet.inference import optimize_for_inference, quantize  # noqa: E402
from hrnetdet.io import atomic_write_text  # noqa: E402
from hrnetdet.zoo import create_model  # noqa: E402

REPORT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "int8.md")
BACKENDS = ["openvino", "onnxruntime"]
CALIBRATION_SIZES = [32, 128, 512]
ACCURACY_MODELS = ["demo_frcnn", "demo_mask", "slicing"]
SPEED_MODELS = ["faster_rcnn_hrnetv2p_w18", "mask_rcnn_hrnetv2p_w18", "faster_rcnn_hrnetv2p_w40"]
INT8_FLAGS = ("avx2", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8",
              "amx_bf16")
CALIBRATION_SEED, EXTRA_SEED, HELDOUT_TILES_SEED, HELDOUT_SEED = 0, 1000, 1001, 1002
HELDOUT_SIZE, NOISE_CHUNKS = 400, 8
DEMO_SHAPES = dict(sizes=demo.IMAGE_SIZES, min_radius=10, max_radius=22)
TILE_SHAPES = dict(sizes=((slicing.TILE, slicing.TILE),), max_objects=8, min_radius=slicing.MIN_RADIUS,
                   max_radius=slicing.MAX_RADIUS)


@dataclass
class Trained:
    """A trained model of the accuracy table and its data: ``train`` and ``heldout`` are (annotation
    file, image folder); ``shapes`` the generator's settings that made ``train``."""
    arch: str
    kwargs: Dict[str, Any]
    run: str
    train: Tuple[str, str]
    heldout: Tuple[str, str]
    shapes: Dict[str, Any] = field(default_factory=dict)


def trained_models(runs: str, heldout: int = HELDOUT_SIZE) -> Dict[str, Trained]:
    """The three trained models, each with ``heldout`` held-out images generated apart (generated once
    under RUNS/heldout/, by the generator of its training images with its settings and a seed of
    its own)."""
    demo_data = os.path.join(runs, "demo_frcnn", "data")
    demo_train = (os.path.join(demo_data, "train.json"), os.path.join(demo_data, "train"))
    demo_heldout = heldout_set(runs, f"demo_{heldout}", heldout, HELDOUT_SEED, DEMO_SHAPES)
    tiles = os.path.join(runs, "slicing", "data")
    return {
        "demo_frcnn": Trained(demo.ARCH, demo.MODEL_KWARGS, os.path.join(runs, "demo_frcnn", "run"),
                              demo_train, demo_heldout, DEMO_SHAPES),
        "demo_mask": Trained("mask_rcnn_hrnetv2p_w18", demo.MODEL_KWARGS, os.path.join(runs, "demo_mask", "run"),
                             demo_train, demo_heldout, DEMO_SHAPES),
        "slicing": Trained(slicing.ARCH, slicing.MODEL_KWARGS, os.path.join(runs, "slicing", "run"),
                           (os.path.join(tiles, "train_tiles.json"), os.path.join(tiles, "train_tiles")),
                           heldout_set(runs, f"tiles_{heldout}", heldout, HELDOUT_TILES_SEED, TILE_SHAPES),
                           TILE_SHAPES),
    }


def heldout_set(runs: str, name: str, num: int, seed: int, shapes: Dict[str, Any]) -> Tuple[str, str]:
    """``num`` held-out images drawn like a model's training images (``shapes``) with ``seed``."""
    folder = os.path.join(runs, "heldout")
    ann = os.path.join(folder, f"{name}.json")
    if os.path.isfile(ann):
        return ann, os.path.join(folder, name)
    return make_shapes_dataset(folder, name, num, seed=seed, **shapes)


def load_trained(spec: Trained) -> torch.nn.Module:
    """The run's last checkpoint, with its categories."""
    last = os.path.join(spec.run, "last")
    with open(os.path.join(last, "config.json")) as f:
        categories = json.load(f)["categories"]
    return create_model(spec.arch, checkpoint_path=os.path.join(last, "model.safetensors"),
                        num_classes=len(categories), categories=categories, **spec.kwargs).eval()


def calibration_images(spec: Trained, num: int, extra_dir: str) -> Tuple[List[torch.Tensor], int]:
    """``num`` images for calibration and how many of them came from the training split (a seeded
    shuffle of it, then images generated like it into ``extra_dir`` when it holds fewer)."""
    train = CocoDetection(*spec.train, with_masks=False)
    order = np.random.default_rng(CALIBRATION_SEED).permutation(len(train))[:num]
    pictures = [train[int(i)][0] for i in order]
    missing = num - len(pictures)
    if missing > 0:
        ann = os.path.join(extra_dir, "extra.json")
        if not os.path.isfile(ann) or len(CocoDetection(ann, os.path.join(extra_dir, "extra"))) < missing:
            make_shapes_dataset(extra_dir, "extra", missing, seed=EXTRA_SEED, **spec.shapes)
        extra = CocoDetection(ann, os.path.join(extra_dir, "extra"), with_masks=False)
        pictures += [extra[i][0] for i in range(missing)]
    return pictures, len(order)


def make_variant(model: torch.nn.Module, backend: str, precision: str, calibration: Optional[List[torch.Tensor]],
                 cache_dir: str, options: Dict[str, Any]) -> Tuple[torch.nn.Module, float]:
    """A copy of ``model`` on ``backend`` in ``precision``, and the seconds it took to make."""
    start = time.perf_counter()
    kwargs = {}
    if precision == "int8":
        kwargs = dict(precision="int8", calibration=calibration, calibration_size=len(calibration), **options)
    made = optimize_for_inference(copy.deepcopy(model), backend=backend, cache_dir=cache_dir, **kwargs)
    return made, time.perf_counter() - start


class HeldOut:
    """A held-out set's detections scored by pycocotools, and the noise of an AP difference: the
    standard error of the paired difference (two models' AP on the same images) estimated from
    ``NOISE_CHUNKS`` disjoint chunks of the images (a seeded split), std(chunk differences)/sqrt(chunks)."""

    def __init__(self, heldout: Tuple[str, str], iou_types: Sequence[str]):
        self.ds = CocoDetection(*heldout, with_masks=False)
        self.iou_types = list(iou_types)
        ids = np.array([int(im["id"]) for im in self.ds.images])
        order = np.random.default_rng(CALIBRATION_SEED).permutation(len(ids))
        self.chunks = [ids[order[i::NOISE_CHUNKS]].tolist() for i in range(NOISE_CHUNKS)]

    def detections(self, model: torch.nn.Module) -> List[dict]:
        return coco_predictions(model, self.ds, progress=False)

    @staticmethod
    def _ap(coco: Any, results: List[dict], iou_type: str, ids: Sequence[int]) -> float:
        recs = results if iou_type == "bbox" else [r for r in results if "segmentation" in r]
        ev = run_cocoeval(coco, recs, iou_type, ids)
        return float(ev.stats[0]) if ev is not None else 0.0

    def scores(self, results: List[dict], base: Optional[List[dict]] = None) -> Dict[str, float]:
        """AP and AP50 per iou type; with ``base`` (the eager fp32 detections), each AP difference's
        standard error as ``{type}_AP_se``."""
        metrics, evals = score(self.ds, results, self.iou_types)
        out = {f"{t}_{k}": metrics[t]["stats"][k] for t in self.iou_types for k in ("AP", "AP50")}
        for t in self.iou_types if base is not None else ():
            coco = evals["coco"]
            deltas = [self._ap(coco, results, t, c) - self._ap(coco, base, t, c) for c in self.chunks]
            out[f"{t}_AP_se"] = float(np.std(deltas, ddof=1) / np.sqrt(len(deltas)))
        return out


def accuracy_rows(name: str, spec: Trained, backends: Sequence[str], sizes: Sequence[int], precision: str,
                  options: Dict[str, Any], extra_dir: str, label: str = "", with_fp32: bool = True) -> List[Dict[str, Any]]:
    """Eager fp32, each backend in fp32 (``with_fp32``), and each backend in ``precision`` per
    calibration size, on the same held-out images."""
    model = load_trained(spec)
    heldout = HeldOut(spec.heldout, default_iou_types(model))
    base = heldout.detections(model)
    common = dict(model=name, heldout=len(heldout.ds))
    rows = [dict(common, variant="eager fp32", **heldout.scores(base))]
    print(rows[-1], flush=True)
    with tempfile.TemporaryDirectory() as cache_dir:
        for backend in backends:
            if precision == "fp32" or with_fp32:
                made, seconds = make_variant(model, backend, "fp32", None, cache_dir, {})
                with made.runtime:
                    rows.append(dict(common, variant=f"{backend} fp32", make_s=round(seconds, 1),
                                     **heldout.scores(heldout.detections(made), base)))
                print(rows[-1], flush=True)
            if precision == "fp32":
                continue
            for num in sizes:
                pictures, from_train = calibration_images(spec, num, extra_dir)
                made, seconds = make_variant(model, backend, precision, pictures, cache_dir, options)
                with made.runtime:
                    rows.append(dict(common, variant=f"{backend} {precision}{label}", calibration=num,
                                     from_train=from_train, make_s=round(seconds, 1),
                                     **heldout.scores(heldout.detections(made), base)))
                print(rows[-1], flush=True)
    return rows


def accuracy_table(rows: List[Dict[str, Any]]) -> str:
    """Markdown rows with each AP's change from the same model's eager fp32 AP."""
    eager = {r["model"]: r for r in rows if r["variant"] == "eager fp32"}

    def ap(row: Dict[str, Any], key: str) -> str:
        if key not in row:
            return "-"
        delta = row[key] - eager[row["model"]][key]
        se = f" ± {row[key + '_se']:.3f}" if key + "_se" in row else ""
        return f"{row[key]:.3f}" if row["variant"] == "eager fp32" else f"{row[key]:.3f} ({delta:+.3f}{se})"

    lines = ["| model | held-out images | variant | calibration images (from training split) "
             "| bbox AP (change ± its standard error) | bbox AP50 | segm AP (change ± its standard error) | segm AP50 "
             "| make s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        calib = f"{r['calibration']} ({r['from_train']})" if "calibration" in r else "-"
        segm = f"{ap(r, 'segm_AP')} | {r['segm_AP50']:.3f}" if "segm_AP" in r else "- | -"
        lines.append(f"| {r['model']} | {r.get('heldout', '-')} | {r['variant']} | {calib} | {ap(r, 'bbox_AP')} "
                     f"| {r['bbox_AP50']:.3f} | {segm} | {r.get('make_s', '-')} |")
    return "\n".join(lines)


# Stages of a two-stage detector's eager detection: the module whose forward each one is.
STAGES = {"preprocess": ["transform"], "backbone+neck": ["backbone"], "RPN": ["rpn"], "RPN head": ["rpn.head"],
          "RoI heads": ["roi_heads"], "RoIAlign": ["roi_heads.box_roi_pool", "roi_heads.mask_roi_pool"],
          "box head": ["roi_heads.box_head", "roi_heads.box_predictor"],
          "mask head": ["roi_heads.mask_head", "roi_heads.mask_predictor"]}
TOP_STAGES = ("preprocess", "backbone+neck", "RPN", "RoI heads")


def stage_times(model: torch.nn.Module, image: torch.Tensor, rounds: int) -> Dict[str, float]:
    """Best over ``rounds`` detections of each stage's CPU seconds (``STAGES``; the process's, all
    its threads: on a shared machine wall time mostly measures the wait for a core), the total, and
    the rest (``postprocess``: the total less the top-level stages: resizing boxes, pasting masks)."""
    modules = dict(model.named_modules())
    spent: Dict[str, float] = {}
    handles = []
    for stage, names in STAGES.items():
        for name in names:
            if name not in modules:
                continue
            started: List[float] = []

            def before(_m, _i, started=started):
                started.append(time.process_time())

            def after(_m, _i, _o, stage=stage, started=started):
                spent[stage] = spent.get(stage, 0.0) + time.process_time() - started.pop()

            handles += [modules[name].register_forward_pre_hook(before), modules[name].register_forward_hook(after)]
    best: Dict[str, float] = {}
    try:
        with torch.inference_mode():
            model([image])  # warm-up
            for _ in range(rounds):
                spent.clear()
                start = time.process_time()
                model([image])
                spent["total"] = time.process_time() - start
                spent["postprocess"] = spent["total"] - sum(spent.get(s, 0.0) for s in TOP_STAGES)
                best = {k: min(v, best.get(k, v)) for k, v in spent.items()}
    finally:
        for h in handles:
            h.remove()
    return best


def stage_table(rows: List[Tuple[str, int, str, Dict[str, float]]]) -> str:
    names = ["total", *TOP_STAGES, "postprocess", "RPN head", "RoIAlign", "box head", "mask head"]
    lines = ["| model | threads | variant | " + " | ".join(f"{n} s" for n in names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    for model, threads, variant, times in rows:
        cells = [f"{times[n]:.3f}" if n in times else "-" for n in names]
        lines.append(f"| {model} | {threads} | {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def speed_rows(names: List[str], threads: List[int], rounds: int, backends: List[str], precision: str,
               options: Dict[str, Any], with_stages: bool, cache: str = ""
               ) -> Tuple[List[str], List[Tuple[str, int, str, Dict]]]:
    """export.py's side-by-side timing of eager and the fp32 backends, with each backend in
    ``precision`` (calibrated on the timing images) beside them; and, optionally, their stages.
    ``cache``: keep the exported and quantized graphs there for a rerun (default: for this run only)."""
    imgs = images(2)
    stages: List[Tuple[str, int, str, Dict[str, float]]] = []

    def measure(name: str, threads: int, sweep_cache: str) -> List[str]:
        cache_dir = cache or sweep_cache
        models = variants(name, imgs, backends, cache_dir, False)
        if precision == "int8":
            for backend in backends:
                models[f"{backend} int8"], seconds = make_variant(models["eager"], backend, "int8", imgs, cache_dir,
                                                                  options)
                print(f"  {backend} int8 made in {seconds:.0f} s", file=sys.stderr, flush=True)
        res = bench(models, imgs, rounds)
        if with_stages:
            for variant, model in models.items():
                stages.append((name, threads, variant, stage_times(model, imgs[0], rounds)))
                print(f"  stages {variant}: {stages[-1][3]}", file=sys.stderr, flush=True)
        for model in models.values():
            if hasattr(model, "runtime"):
                model.runtime.close()
        return [f"| {name} | {threads} | {k} | {v['cpu']:.2f} | {v['user']:.2f} | {v['wall']:.2f} "
                f"| {v['ratio']:.2f} | {v['user_ratio']:.2f} | {v['wall_ratio']:.2f} | {100 * v['matched']:.1f} % |"
                for k, v in res.items()]

    return sweep(threads, names, measure), stages


def cpu_features() -> str:
    """The CPU's model and which of its int8-relevant instruction sets it has, and OpenVINO's view."""
    model, flags = "?", set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    have = [f for f in INT8_FLAGS if f in flags]
    missing = [f for f in INT8_FLAGS if f not in flags]
    text = f"{model}, {os.cpu_count()} logical CPUs; has {' '.join(have) or 'none'}; lacks {' '.join(missing) or 'none'}"
    try:
        from hrnetdet.inference.runtime import openvino_core
        caps = openvino_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        text += f"; OpenVINO CPU capabilities {' '.join(caps)}"
    except ImportError:
        pass
    return text


class OtherLoad:
    """How many cores other processes kept busy while a block ran (the machine's busy time from
    /proc/stat less this process's CPU time, over the wall time)."""

    @staticmethod
    def _busy() -> float:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
        idle = ticks[3] + ticks[4]  # idle and iowait
        return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    def __enter__(self) -> "OtherLoad":
        self.start = (time.time(), self._busy(), sum(os.times()[:2]))
        return self

    def __exit__(self, *exc: Any) -> None:
        wall, busy, own = time.time() - self.start[0], self._busy() - self.start[1], sum(os.times()[:2]) - self.start[2]
        self.cores = max(busy - own, 0.0) / max(wall, 1e-9)


def write_section(path: str, name: str, text: str) -> None:
    """Put ``text`` between ``path``'s markers for section ``name`` (replacing what was there), or
    append it with its markers; the rest of the file is kept."""
    begin, end = f"<!-- {name}: written by benchmarks/int8.py -->", f"<!-- /{name} -->"
    old = open(path).read() if os.path.exists(path) else "# int8 on the CPU\n"
    block = f"{begin}\n{text.strip()}\n{end}"
    if begin in old and end in old:
        new = old[:old.index(begin)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    atomic_write_text(path, new)
    print(text)


def versions() -> str:
    import onnxruntime
    import openvino
    try:
        import nncf
        quantizer = f", NNCF {nncf.__version__}"
    except ImportError:
        quantizer = ""
    return f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, OpenVINO {openvino.__version__}{quantizer}"


def keep_fp32(parts: Optional[List[str]]) -> str:
    """Leave ``parts`` (last names: backbone, head, box_head, box_predictor, mask_head,
    mask_predictor) in float32 for this run, instead of the package's choice; returns a label."""
    if parts is not None:
        quantize.FP32_PARTS = tuple(p for p in parts if p != "none")
    return " (fp32: " + (", ".join(quantize.FP32_PARTS) or "none") + ")"


def run_accuracy(args: argparse.Namespace) -> int:
    specs = trained_models(args.runs, args.heldout)
    label = keep_fp32(args.fp32_parts)
    load_start = os.getloadavg()
    rows: List[Dict[str, Any]] = []
    with OtherLoad() as other:
        for name in args.models:
            rows += accuracy_rows(name, specs[name], args.backends, args.calibration, args.precision, args.options,
                                  os.path.join(args.runs, "calibration", name.split("_")[0]), label,
                                  not args.skip_fp32_backends)
    with open(os.path.join(args.runs, f"accuracy_{'_'.join(args.models)}{args.section}.json".replace(" ", "_")), "w") as f:
        json.dump(rows, f, indent=2)
    text = "\n".join([f"### Accuracy: {', '.join(args.models)}, {', '.join(args.backends)}{args.section}", "",
                      provenance(load_start, versions()) + f" Other processes kept {other.cores:.1f} of the "
                      f"{os.cpu_count()} cores busy. CPU: {cpu_features()}.", "", accuracy_table(rows)])
    write_section(args.out, f"accuracy {' '.join(args.models)}{args.section}", text)
    return 0


def run_speed(args: argparse.Namespace) -> int:
    keep_freed_memory()
    load_start = os.getloadavg()
    keep_fp32(args.fp32_parts)
    with OtherLoad() as other:
        rows, stages = speed_rows(args.models, args.threads, args.rounds, args.backends, args.precision, args.options,
                                  args.stages, args.cache_dir)
    lines = [f"### Speed: {', '.join(args.models)}, {'/'.join(map(str, args.threads))} thread(s)", "",
             provenance(load_start, versions()) + f" Other processes kept {other.cores:.1f} of the {os.cpu_count()} "
             f"cores busy. CPU: {cpu_features()}.", "",
             "| model | threads | variant | CPU s/img | user s/img | wall s/img | CPU ratio | user ratio | wall ratio "
             "| parity |", "|---|---|---|---|---|---|---|---|---|---|", *rows]
    if stages:
        lines += ["", f"Stages (best of {args.rounds} detections of the first image, process CPU seconds):", "",
                  stage_table(stages)]
    write_section(args.out, f"speed {' '.join(args.models)} {' '.join(map(str, args.threads))}{args.section}",
                  "\n".join(lines))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["accuracy", "speed"])
    p.add_argument("--runs", default="int8_runs", help="the trained models' folder (accuracy)")
    p.add_argument("--models", nargs="+", default=None,
                   help=f"accuracy: demo_frcnn demo_mask slicing; speed: default {' '.join(SPEED_MODELS)}")
    p.add_argument("--backends", nargs="+", default=BACKENDS)
    p.add_argument("--heldout", type=int, default=HELDOUT_SIZE, help="accuracy: held-out images per model")
    p.add_argument("--calibration", nargs="+", type=int, default=CALIBRATION_SIZES, help="calibration set sizes")
    p.add_argument("--precision", choices=["int8", "fp32"], default="int8",
                   help="fp32: the backends only (checks the harness without the int8 rows)")
    p.add_argument("--options", type=json.loads, default={},
                   help="more keyword arguments of optimize_for_inference's int8 path, as JSON")
    p.add_argument("--fp32-parts", nargs="+", default=None,
                   help="int8 ablation: these parts stay float32 ('none': quantize all) instead of the package's choice")
    p.add_argument("--skip-fp32-backends", action="store_true", help="accuracy: without the backends' fp32 rows")
    p.add_argument("--threads", nargs="+", type=int, default=[1])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--stages", action="store_true", help="speed: also time each variant's stages")
    p.add_argument("--cache-dir", default="", help="speed: keep the graphs here for reruns (default: a temporary one)")
    p.add_argument("--out", default=REPORT)
    p.add_argument("--section", default="", help="a suffix that keeps this run's section apart from others'")
    args = p.parse_args(argv)
    if args.command == "accuracy":
        args.models = args.models or ACCURACY_MODELS
        torch.set_num_threads(args.threads[0])
        return run_accuracy(args)
    args.models = args.models or SPEED_MODELS
    return run_speed(args)


if __name__ == "__main__":
    sys.exit(main())
