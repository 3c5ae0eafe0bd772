"""Training curves from ``metrics.jsonl``: loss, learning rate and validation AP as PNG files."""
import json
import os
from typing import Dict, List


def read_metrics(path: str) -> List[Dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(metrics_file: str, out_dir: str) -> List[str]:
    """Write loss.png, lr.png and (when validation records exist) ap.png; returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    records = read_metrics(metrics_file) if os.path.isfile(metrics_file) else []
    train = [r for r in records if r.get("type") == "train"]
    val = [r for r in records if r.get("type") == "val"]
    written = []

    def save(fig, name):
        path = os.path.join(out_dir, name)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

    if train:
        it = [r["iter"] for r in train]
        fig, ax = plt.subplots(figsize=(7, 4))
        for key in ["loss"] + sorted(k for k in train[0] if k.startswith("loss_")):
            ax.plot(it, [r.get(key, float("nan")) for r in train], label=key, lw=2 if key == "loss" else 1)
        ax.set_xlabel("iteration")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        save(fig, "loss.png")
        fig, ax = plt.subplots(figsize=(7, 3))
        ax.plot(it, [r["lr"] for r in train])
        ax.set_xlabel("iteration")
        ax.set_ylabel("learning rate")
        ax.grid(alpha=0.3)
        save(fig, "lr.png")
    if val:
        fig, ax = plt.subplots(figsize=(7, 4))
        for key in ("bbox_AP", "bbox_AP50", "segm_AP", "segm_AP50"):
            if key in val[0]:
                ax.plot([r["iter"] for r in val], [r[key] for r in val], marker="o", label=key)
        ax.set_xlabel("iteration")
        ax.set_ylabel("validation AP")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        save(fig, "ap.png")
    return written
