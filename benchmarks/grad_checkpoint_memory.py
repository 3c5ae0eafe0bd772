"""Peak memory of one training step of HRNetV2p-W18 Mask R-CNN (default: batch 2, 800x1333), with
and without gradient checkpointing of the HRNet body (``fit(grad_checkpoint=True)``).

    OMP_NUM_THREADS=1 python benchmarks/grad_checkpoint_memory.py [--batch 2 --size 800 1333]

Each setting runs in its own fresh process (peak RSS cannot be reset within one), twice, in
alternation; the step's memory is its peak RSS minus the RSS just before the step (model, optimizer
state and inputs resident), so that the ratio compares what the activations cost. On CUDA (when
present) the same is read from torch.cuda.max_memory_allocated. Prints a markdown table.
"""
import argparse
import json
import platform
import resource
import subprocess
import sys

import torch


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2 ** 20


def one_step(checkpointing: bool, device: str, batch: int, height: int, width: int) -> dict:
    import hrnetdet
    torch.manual_seed(0)
    model = hrnetdet.create_model("mask_rcnn_hrnetv2p_w18", num_classes=81).to(device).train()
    if checkpointing:
        model.backbone.body.set_grad_checkpointing(True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    images = [torch.rand(3, height, width, device=device) for _ in range(batch)]
    targets = []
    for _ in range(batch):
        xy = torch.rand(8, 2) * torch.tensor([width * 0.8, height * 0.75])
        boxes = torch.cat([xy, xy + 40 + torch.rand(8, 2) * 180], 1).clamp(max=min(height, width) - 1).to(device)
        boxes[:, 2] = torch.maximum(boxes[:, 2], boxes[:, 0] + 8)
        boxes[:, 3] = torch.maximum(boxes[:, 3], boxes[:, 1] + 8)
        masks = torch.zeros(8, height, width, dtype=torch.uint8, device=device)
        for m, b in zip(masks, boxes.int().tolist()):
            m[b[1]:b[3], b[0]:b[2]] = 1
        targets.append({"boxes": boxes, "labels": torch.randint(1, 81, (8,), device=device), "masks": masks})
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2 ** 20
    else:
        before = rss_mb()
    losses = model(images, targets)
    sum(losses.values()).backward()
    optimizer.step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"checkpointing": checkpointing, "before_mb": before, "peak_mb": peak, "step_mb": peak - before}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, nargs=2, default=(800, 1333), metavar=("HEIGHT", "WIDTH"))
    p.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(one_step(args.child == "on", args.device, args.batch, *args.size)))
        return
    runs = {"off": [], "on": []}
    for _ in range(args.repeats):
        for setting in ("off", "on"):
            out = subprocess.run([sys.executable, __file__, "--child", setting, "--device", args.device,
                                  "--batch", str(args.batch), "--size", *map(str, args.size)],
                                 check=True, capture_output=True, text=True).stdout
            runs[setting].append(json.loads(out.strip().splitlines()[-1]))
    step = {k: min(r["step_mb"] for r in v) for k, v in runs.items()}
    peak = {k: min(r["peak_mb"] for r in v) for k, v in runs.items()}
    print(f"W18 Mask R-CNN, batch {args.batch}, {args.size[0]}x{args.size[1]}, one SGD step on {args.device} "
          f"({platform.processor() or platform.machine()}, torch {torch.__version__}); min of {args.repeats} runs")
    print("| grad checkpointing | step memory (MB) | peak (MB) |\n|---|---|---|")
    for k in ("off", "on"):
        print(f"| {k} | {step[k]:.0f} | {peak[k]:.0f} |")
    print(f"ratio on/off: step {step['on'] / step['off']:.2f}x, peak {peak['on'] / peak['off']:.2f}x")


if __name__ == "__main__":
    main()
