"""Training logs and curves from ``metrics.jsonl``: metrics.csv (for spreadsheets and pandas) and
loss, learning-rate and validation-AP curves as PNG files."""
import csv
import json
import os
from typing import Dict, List

from ..io import atomic_write


def read_metrics(path: str) -> List[Dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def loss_keys(train: List[Dict]) -> List[str]:
    """The series loss.png draws: the total, then every ``loss_*`` term any record has."""
    return ["loss"] + sorted({k for r in train for k in r if k.startswith("loss_")})


def write_csv(records: List[Dict], path: str) -> None:
    """Every record as a row; columns: ``type``, ``iter`` then every other key in first-seen order."""
    columns = ["type", "iter"]
    for r in records:
        columns += [k for k in r if k not in columns]

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, columns)
            writer.writeheader()
            writer.writerows(records)
    atomic_write(path, write)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display on training machines)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_curves(metrics_file: str, out_dir: str) -> List[str]:
    """Write metrics.csv, loss.png, lr.png and (when validation records exist) ap.png; returns the
    picture paths. Every logged point is drawn (with markers when there are few); AP is scaled to
    its data, so small values early in a run stay readable."""
    plt = pyplot()
    from matplotlib.ticker import FormatStrFormatter, LogLocator, MaxNLocator, NullFormatter
    records = read_metrics(metrics_file) if os.path.isfile(metrics_file) else []
    write_csv(records, os.path.join(out_dir, "metrics.csv"))
    train = [r for r in records if r.get("type") == "train"]
    val = [r for r in records if r.get("type") == "val"]
    written = []

    def save(fig, ax, name):
        ax.set_xlabel("iteration")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3, which="both")
        path = os.path.join(out_dir, name)
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
        plt.close(fig)
        written.append(path)

    if train:
        it = [r["iter"] for r in train]
        marker = "o" if len(train) <= 30 else None
        fig, ax = plt.subplots(figsize=(7, 4))
        for key in loss_keys(train):
            ax.plot(it, [r.get(key, float("nan")) for r in train], label=key, lw=2 if key == "loss" else 1,
                    marker=marker, ms=3)
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.legend(fontsize=8)
        save(fig, ax, "loss.png")
        fig, ax = plt.subplots(figsize=(7, 3))
        ax.plot(it, [r["lr"] for r in train], marker=marker, ms=3)
        ax.set_ylabel("learning rate")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        save(fig, ax, "lr.png")
    if val:
        fig, ax = plt.subplots(figsize=(7, 4))
        shown = []
        for key in ("bbox_AP", "bbox_AP50", "segm_AP", "segm_AP50"):
            if key in val[0]:
                values = [r[key] for r in val]
                shown += values
                ax.plot([r["iter"] for r in val], values, marker="o", label=key)
        top = max(shown + [1e-3])
        ax.set_ylim(0, min(1.0, top * 1.15))
        ax.set_ylabel("validation AP")
        ax.legend(fontsize=8)
        save(fig, ax, "ap.png")
    return written
