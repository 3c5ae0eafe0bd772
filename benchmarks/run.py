"""Side-by-side speed and memory of hrnetdet's detectors and torchvision's ResNet-50-FPN ones.

    python benchmarks/run.py                      # every family and width, CPU (and CUDA if present)
    python benchmarks/run.py --quick --models faster_rcnn_hrnetv2p_w18 mask_rcnn_hrnetv2p_w18

All models run in one process on the same images, alternating model by model within each round
after a warm-up round, so that load from other processes falls on all of them alike. Weights are
random but calibrated (``tools/calibrate.py``: batch-norm statistics re-estimated on the
images, pyramid levels at unit scale, score threshold 0), so every image carries the full 100
detections a trained model would; with raw random weights the RPN finds no valid boxes and the
timing would measure an empty pipeline. torchvision's models are measured "as shipped" (frozen batch
norm, default memory layout) and with the same fast path as ours (norms folded, channels-last).
Writes a markdown table (``--out``, default benchmarks/results.md).
"""
import argparse
import copy
import datetime
import os
import platform
import statistics
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torchvision
from torch import nn
from torchvision.models import detection as tvd
from torchvision.ops.misc import FrozenBatchNorm2d

import hrnetdet
from hrnetdet.detectors import has_masks
from hrnetdet.inference import fold_batchnorm, optimize_for_inference

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
from calibrate import calibrate  # noqa: E402  (a maintainer helper, not in the installed package)

TORCHVISION = {"faster_rcnn": "fasterrcnn_resnet50_fpn", "mask_rcnn": "maskrcnn_resnet50_fpn",
               "fcos": "fcos_resnet50_fpn", "cascade_rcnn": "fasterrcnn_resnet50_fpn",
               "cascade_mask_rcnn": "maskrcnn_resnet50_fpn", "htc": "maskrcnn_resnet50_fpn"}
COMPILED = " (fast, compiled)"
QUICK_MODELS = ["faster_rcnn_hrnetv2p_w18", "faster_rcnn_hrnetv2p_w32", "mask_rcnn_hrnetv2p_w18"]


def images(n: int) -> List[torch.Tensor]:
    """COCO-sized (427x640, 400x600) natural images from scikit-image; the detectors' transform
    resizes them to 800x1199 and 800x1200, padded to 800x1216."""
    from skimage import data
    pics = [data.rocket(), data.coffee()]
    return [torch.from_numpy(pics[i % 2]).permute(2, 0, 1).float().div(255) for i in range(n)]


# glibc malloc settings (malloc.h's mallopt parameter, value) that keep freed memory for reuse.
MALLOC_SETTINGS = {"TRIM_THRESHOLD": (-1, 2 ** 31 - 1), "TOP_PAD": (-2, 2 ** 30),
                   "MMAP_THRESHOLD": (-3, 2 ** 25)}  # 32 MiB: glibc's largest on 64-bit


def keep_freed_memory() -> None:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the kernel.

    Eager PyTorch allocates and frees gigabytes of large tensors per detection; by default glibc
    hands much of it back, and the next detection pays the kernel for fresh zeroed pages. How much
    depends on what else the process allocated: beside an onnxruntime session, eager W40 spent 3-4 s
    of system time per image against 0-1 s alone, on 6.5 s of computation. With this, every variant
    of a side-by-side run is timed on its computation."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    for param, value in MALLOC_SETTINGS.values():
        libc.mallopt(param, value)


def keep_freed_memory_env() -> Dict[str, str]:
    """The same settings as environment variables, for a child process."""
    return {f"MALLOC_{name}_": str(value) for name, (_, value) in MALLOC_SETTINGS.items()}


def freeze_norms(model: nn.Module) -> nn.Module:
    """Replace BatchNorm2d by FrozenBatchNorm2d with the same statistics, as torchvision ships
    its pretrained detectors."""
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, child.eps)
            for k in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, k).copy_(getattr(child, k).detach())
            setattr(model, name, frozen.eval())
        else:
            freeze_norms(child)
    return model


def torchvision_fast(model: nn.Module) -> nn.Module:
    """The same treatment as hrnetdet's fast path: norms folded, backbone channels-last."""
    fold_batchnorm(model.backbone.body)
    model.backbone.to(memory_format=torch.channels_last)
    return model


def build(name: str, calib: List[torch.Tensor], device: torch.device, min_size: int, max_size: int
          ) -> nn.Module:
    torch.manual_seed(0)
    if name in hrnetdet.list_models():
        model = hrnetdet.create_model(name, min_size=min_size, max_size=max_size)
        return calibrate(model.to(device), [c.to(device) for c in calib])
    model = getattr(tvd, name)(weights=None, weights_backbone=None, min_size=min_size, max_size=max_size)
    calibrate(model.to(device), [c.to(device) for c in calib])
    return freeze_norms(model)


class PeakMemory:
    """Peak CUDA allocation, or peak resident set size above the start (sampled every 2 ms),
    during a block."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self._rss()
            self.stop = False
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop:
            self.peak = max(self.peak, self._rss() - self.base)
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.stop = True
            self.thread.join()


def _cpu_clock() -> float:
    # With one intra-op thread all the work runs on this thread: its CPU time is immune to the
    # time other processes on a shared machine take from it.
    return time.thread_time() if torch.get_num_threads() == 1 else time.process_time()


def _timed(fn: Callable[[], object], device: torch.device) -> Tuple[float, float]:
    """Wall-clock and CPU seconds of ``fn()``."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t, c = time.perf_counter(), _cpu_clock()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, _cpu_clock() - c


def bench_inference(models: Dict[str, nn.Module], imgs: List[torch.Tensor], device: torch.device,
                    rounds: int, batch: int, autocast: Optional[torch.dtype] = None) -> Dict[str, Dict[str, float]]:
    """Median wall and CPU seconds per image over ``rounds`` alternating rounds after one warm-up
    round; ``autocast`` runs the models under ``torch.autocast`` in that dtype."""
    times: Dict[str, List[float]] = {k: [] for k in models}
    cpu: Dict[str, List[float]] = {k: [] for k in models}
    mem: Dict[str, int] = {k: 0 for k in models}
    dets: Dict[str, int] = {}
    with torch.inference_mode():
        for r in range(rounds + 1):
            for k, model in models.items():
                x = [imgs[(r + i) % len(imgs)].to(device) for i in range(batch)]
                with PeakMemory(device) as pm, torch.autocast(device.type, autocast or torch.float32,
                                                              enabled=autocast is not None):
                    out: list = []
                    t, c = _timed(lambda: out.extend(model(x)), device)
                if r == 0:
                    dets[k] = min(len(o["scores"]) for o in out)
                    continue
                times[k].append(t / batch)
                cpu[k].append(c / batch)
                mem[k] = max(mem[k], pm.peak)
                print(f"  round {r} {k}: {t / batch * 1000:.0f} ms/img wall, {c / batch * 1000:.0f} ms/img CPU",
                      file=sys.stderr, flush=True)
    return {k: {"s_per_img": statistics.median(v), "cpu_s_per_img": statistics.median(cpu[k]),
                "peak_mb": mem[k] / 2 ** 20, "dets": dets[k]} for k, v in times.items()}


def synthetic_targets(imgs: List[torch.Tensor], masks: bool, device: torch.device) -> List[dict]:
    out = []
    for img in imgs:
        h, w = img.shape[-2:]
        boxes = torch.tensor([[0.1 * w, 0.1 * h, 0.5 * w, 0.6 * h], [0.4 * w, 0.3 * h, 0.9 * w, 0.9 * h]])
        t = {"boxes": boxes.to(device), "labels": torch.tensor([1, 3], device=device)}
        if masks:
            m = torch.zeros(2, h, w, dtype=torch.uint8)
            for i, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
                m[i, y0:y1, x0:x1] = 1
            t["masks"] = m.to(device)
        out.append(t)
    return out


def bench_train(models: Dict[str, nn.Module], imgs: List[torch.Tensor], device: torch.device,
                iters: int, amp: bool) -> Dict[str, Dict[str, float]]:
    """Seconds per SGD step at batch 2 (and peak memory), alternating models after one warm-up."""
    x = [i.to(device) for i in imgs[:2]]
    opts = {k: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-5, momentum=0.9)
            for k, m in models.items()}
    times: Dict[str, List[float]] = {k: [] for k in models}
    mem: Dict[str, int] = {k: 0 for k in models}
    for r in range(iters + 1):
        for k, model in models.items():
            model.train()
            y = synthetic_targets(x, has_masks(model), device)

            def step():
                with torch.autocast(device.type, enabled=amp):
                    loss = sum(model(x, y).values())
                opts[k].zero_grad()
                loss.backward()
                opts[k].step()
            with PeakMemory(device) as pm:
                t, _ = _timed(step, device)
            if r:
                times[k].append(t)
                mem[k] = max(mem[k], pm.peak)
                print(f"  train round {r} {k}: {t:.2f} s/it", file=sys.stderr, flush=True)
    return {k: {"s_per_it": statistics.median(v), "peak_mb": mem[k] / 2 ** 20} for k, v in times.items()}


def provenance(load_start: Tuple[float, float, float], versions: str) -> str:
    """Where and how a benchmark ran: its command line, the date, the machine, ``versions``, and the
    load average at the start (``load_start``, from ``os.getloadavg()``) and now."""
    def load(avg) -> str:
        return "/".join(f"{x:.1f}" for x in avg)

    return (f"`python benchmarks/{os.path.basename(sys.argv[0])} {' '.join(sys.argv[1:])}` on "
            f"{datetime.date.today()}: {platform.processor() or platform.machine()}, {os.cpu_count()} logical "
            f"CPUs, {versions}. Load average (1/5/15 min) {load(load_start)} at the start, "
            f"{load(os.getloadavg())} at the end.")


def write_report(path: str, text: str) -> None:
    """Write a benchmark's markdown report and show it."""
    with open(path, "w") as f:
        f.write(text)
    print(text)


def base_name(key: str) -> str:
    """The model behind a results key: ``"x (fast)"`` and ``"x (fast, compiled)"`` are ``x``."""
    return key.split(" (")[0]


def select(models: Dict[str, nn.Module], archs: Optional[List[str]]) -> Dict[str, nn.Module]:
    """The entries of ``models`` that belong to ``archs`` or to their torchvision counterparts
    (every entry when ``archs`` is None)."""
    if archs is None:
        return models
    keep = set(archs) | {TORCHVISION[hrnetdet.zoo.registry.get_family(a)[0].name] for a in archs}
    return {k: m for k, m in models.items() if base_name(k) in keep}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", help="hrnetdet architectures (default: every family and width; "
                   "--quick: W18/W32 Faster R-CNN and W18 Mask R-CNN)")
    p.add_argument("--quick", action="store_true", help="fewer models and rounds; no batch-8 or training runs")
    p.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    p.add_argument("--rounds", type=int, help="timed rounds (default 5, --quick 3)")
    p.add_argument("--no-fast", action="store_true", help="skip the fast-path variants")
    p.add_argument("--compile", nargs="*", metavar="ARCH",
                   help="also time the fast path with the backbone compiled (torch.compile; compiled "
                        "during the warm-up round), for these architectures (none named: all)")
    p.add_argument("--batch8-models", nargs="+", metavar="ARCH",
                   help="time batch-8 throughput only for these architectures (and their torchvision "
                        "counterparts); default: all")
    p.add_argument("--train-models", nargs="+", metavar="ARCH",
                   help="time training steps only for these architectures (and their torchvision "
                        "counterparts); default: all")
    p.add_argument("--no-batch8", action="store_true", help="skip the batch-8 throughput runs")
    p.add_argument("--no-train", action="store_true", help="skip the training-step runs")
    p.add_argument("--min-size", type=int, default=800)
    p.add_argument("--max-size", type=int, default=1333)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    archs = args.models or (QUICK_MODELS if args.quick else hrnetdet.list_models())
    rounds = args.rounds or (3 if args.quick else 5)
    batch8 = not (args.quick or args.no_batch8)
    train = not (args.quick or args.no_train)
    imgs = images(8)
    lines = [
        "# Benchmarks", "",
        f"`python benchmarks/run.py {' '.join(argv if argv is not None else sys.argv[1:])}` on "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}, {platform.processor() or platform.machine()}, "
        f"{args.threads} threads, load average before the run {os.getloadavg()[0]:.1f}. Images: COCO-sized "
        f"427x640 and 400x600 resized to {args.min_size} short side (at most {args.max_size} long side). Random weights, "
        "calibrated, score threshold 0: 100 detections per image. Median of "
        f"{rounds} alternating rounds after a warm-up. Ratio: time / torchvision's counterpart as shipped "
        "(frozen BN, NCHW); *fast ratio*: time / torchvision's counterpart with the same fast treatment "
        "(BN folded, channels-last). Memory: peak CUDA allocation, or peak RSS growth on the CPU.", "",
    ]
    for dev_name in args.devices:
        device = torch.device(dev_name)
        families = sorted({hrnetdet.zoo.registry.get_family(a)[0].name for a in archs})
        models: Dict[str, nn.Module] = {}
        for fam in families:
            tv = TORCHVISION[fam]
            if tv not in models:
                models[tv] = build(tv, imgs[:2], device, args.min_size, args.max_size)
                if not args.no_fast:
                    models[tv + " (fast)"] = torchvision_fast(copy.deepcopy(models[tv]))
        for a in archs:
            models[a] = build(a, imgs[:2], device, args.min_size, args.max_size)
            if not args.no_fast:
                models[a + " (fast)"] = optimize_for_inference(copy.deepcopy(models[a]))
            if args.compile is not None and (not args.compile or a in args.compile):
                models[a + COMPILED] = optimize_for_inference(copy.deepcopy(models[a]), compile=True)
        print(f"{device}: {len(models)} models, load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
        res1 = bench_inference(models, imgs, device, rounds, 1)
        res8 = (bench_inference(select(models, args.batch8_models), imgs, device, max(1, rounds // 2), 8)
                if batch8 else {})
        # On a shared CPU the thread's CPU time is the stable measure; on CUDA, wall time.
        key = "cpu_s_per_img" if device.type == "cpu" else "s_per_img"
        lines += [f"## Inference, {device.type.upper()}", "",
                  f"Ratios from {'CPU' if device.type == 'cpu' else 'wall-clock'} time.", "",
                  "| model | ms/img wall (batch 1) | ms/img CPU | ratio | fast ratio | img/s (batch 8) | peak MB | dets/img |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for k, r in res1.items():
            base = base_name(k)
            fam = hrnetdet.zoo.registry.get_family(base)[0].name if base in hrnetdet.list_models() else None
            tv = TORCHVISION[fam] if fam else base
            ratio = r[key] / res1[tv][key]
            fast_ratio = (r[key] / res1[tv + " (fast)"][key]
                          if k != base and tv + " (fast)" in res1 else None)
            tput = f"{1 / res8[k]['s_per_img']:.2f}" if k in res8 else "-"
            lines.append(f"| {k} | {r['s_per_img'] * 1000:.0f} | {r['cpu_s_per_img'] * 1000:.0f} | {ratio:.2f} | "
                         f"{'-' if fast_ratio is None else f'{fast_ratio:.2f}'} | {tput} | "
                         f"{r['peak_mb']:.0f} | {r['dets']} |")
        lines += ["", f"Load average after: {os.getloadavg()[0]:.1f}.", ""]
        if train:
            plain = {k: m for k, m in select(models, args.train_models).items() if k == base_name(k)}
            for k in plain:  # training needs the unfolded, calibrated models in train mode
                plain[k] = plain[k].to(device)
            lines += [f"## Training step, batch 2, {device.type.upper()}", "",
                      "| model | precision | s/iter | peak MB |", "|---|---|---:|---:|"]
            for amp in ([False, True] if device.type == "cuda" else [False]):
                for k, r in bench_train(plain, imgs, device, max(2, rounds // 2), amp).items():
                    lines.append(f"| {k} | {'AMP' if amp else 'fp32'} | {r['s_per_it']:.2f} | {r['peak_mb']:.0f} |")
            lines.append("")
        del models
    write_report(args.out, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
