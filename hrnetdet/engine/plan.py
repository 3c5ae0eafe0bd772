"""The run's settings (``TrainConfig``), what they resolve to in iterations (``Plan``) and the
reference's optimizer recipe: parameter groups, warm-up and step decay (docs/NUMERICS.md,
'Training recipe'). ``Run`` is the fixed context the loop and the callbacks read."""
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..zoo.recipe import Recipe
from ..zoo.registry import get_arch_pretrained_cfgs
from .interrupt import GracefulStop

# The learning rate drops x0.1 at these fractions of the run (1x: epochs 8 and 11 of 12, ...).
SCHEDULES = {"1x": (8 / 12, 11 / 12), "2x": (16 / 24, 22 / 24), "20e": (16 / 20, 19 / 20)}


def default_schedule(arch: str) -> str:
    """The shortest schedule the reference published for the architecture (cascades and HTC: 20e)."""
    published = {c.schedule for c in get_arch_pretrained_cfgs(arch)}
    return next((s for s in ("1x", "20e", "2x") if s in published), "1x")


def param_groups(model: nn.Module, lr: float, weight_decay: float, recipe: Recipe) -> List[Dict[str, Any]]:
    """mmcv's DefaultOptimizerConstructor rule: biases of non-norm layers get ``bias_lr_mult`` and
    ``bias_decay_mult``; frozen parameters are left out."""
    norm_types = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
    plain, bias = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            (bias if name == "bias" and not isinstance(module, norm_types) else plain).append(p)
    if recipe.bias_lr_mult == 1.0 and recipe.bias_decay_mult == 1.0:
        return [{"params": plain + bias, "lr": lr, "weight_decay": weight_decay}]
    return [{"params": plain, "lr": lr, "weight_decay": weight_decay},
            {"params": bias, "lr": lr * recipe.bias_lr_mult, "weight_decay": weight_decay * recipe.bias_decay_mult}]


def lr_factor(it: int, milestones: Sequence[int], warmup_iters: int, recipe: Recipe) -> float:
    """The multiplier of the base learning rate at iteration ``it`` (mmcv's warm-up formulas)."""
    factor = 0.1 ** sum(it >= m for m in milestones)
    if it < warmup_iters:
        if recipe.warmup == "constant":
            return factor * recipe.warmup_ratio
        return factor * (1 - (1 - it / warmup_iters) * (1 - recipe.warmup_ratio))
    return factor


@dataclass
class TrainConfig:
    """The settings of a run (``fit``'s keyword arguments).

    Attributes:
        epochs / iters: the run length (exactly one of them).
        batch_size: images per process; the total batch is ``batch_size x world size``.
        lr: default: the family's base rate x total batch / 16 (R-CNN 0.02, FCOS 0.01).
        schedule: "1x", "2x" or "20e": LR x0.1 at the reference's fractions of the run; default:
            the family's shortest published schedule.
        warmup_iters: the reference's 500, capped at a quarter of the run.
        grad_clip: max gradient L2 norm; default: the recipe's (FCOS 35, R-CNN none); 0 disables.
        amp: True (bf16 where supported, else fp16 with a GradScaler), "bf16" or "fp16"; CUDA only.
        resume: True continues from ``out_dir/training_state.pt`` when it exists; a path names a
            state file. Model, optimizer, schedule, scaler, iteration, RNG states and the
            sampler position are restored, so an interrupted run ends with the same weights.
        aug: augmentation preset: "none", "flip" (the reference's horizontal flip, p=0.5),
            "photometric" or "scale-jitter" (see ``data.transforms.Augment``).
        multiscale: training shorter-side choices, e.g. (640, 800) as the reference's ms configs;
            evaluation uses the last.
        filter_empty: drop training images without annotations (the reference's filter_empty_gt).
        checkpoint_every: iterations between checkpoints (and validations); default: about ten
            per run (whole epochs with ``epochs``), and at least 10 iterations apart.
        log_every: iterations between the records of metrics.jsonl; default: about 50 records per
            run, at least every 20 iterations.
        max_nonfinite: stop after this many consecutive skipped (non-finite) losses.
        ema: keep an exponential moving average of the weights with this decay (ramped up as
            timm's ModelEmaV3 warm-up does); it is what is validated and saved in last/ and best/.
        patience: stop when validation bbox AP has not improved for this many validations.
        grad_checkpoint: recompute the HRNet body's activations in the backward pass (less
            memory, about a third more compute).
    """
    epochs: Optional[int] = None
    iters: Optional[int] = None
    batch_size: int = 2
    lr: Optional[float] = None
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: Optional[str] = None
    warmup_iters: int = 500
    grad_clip: Optional[float] = None
    amp: Union[bool, str] = False
    device: Optional[str] = None
    resume: Union[bool, str] = False
    seed: int = 0
    aug: str = "flip"
    multiscale: Optional[Sequence[int]] = None
    filter_empty: bool = True
    num_workers: int = 0
    checkpoint_every: Optional[int] = None
    log_every: Optional[int] = None
    progress: bool = True
    max_nonfinite: int = 20
    ema: Optional[float] = None
    patience: Optional[int] = None
    grad_checkpoint: bool = False

    def check(self) -> None:
        if (self.epochs is None) == (self.iters is None):
            raise ValueError("give exactly one of epochs or iters")
        for name in ("epochs", "iters", "checkpoint_every", "log_every", "patience"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.ema is not None and not 0 < self.ema < 1:
            raise ValueError(f"ema decay must be in (0, 1), got {self.ema}")
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; known: {sorted(SCHEDULES)}")


@dataclass(frozen=True)
class Plan:
    """The run's length and schedule in iterations, resolved from the config and the data."""
    per_epoch: int
    total: int
    milestones: Tuple[int, ...]
    warmup_iters: int
    checkpoint_every: int
    log_every: int
    lr: float
    grad_clip: Optional[float]

    @classmethod
    def resolve(cls, config: TrainConfig, per_epoch: int, world: int, recipe: Recipe, arch: str) -> "Plan":
        fractions = SCHEDULES[config.schedule or default_schedule(arch)]
        if config.epochs is not None:
            total = config.epochs * per_epoch
            milestones = tuple(round(f * config.epochs) * per_epoch for f in fractions)
            epochs_apart = max(math.ceil(config.epochs / 10), math.ceil(min(total, 10) / per_epoch))
            checkpoint_every = config.checkpoint_every or epochs_apart * per_epoch
        else:
            total = config.iters
            milestones = tuple(round(f * total) for f in fractions)
            checkpoint_every = config.checkpoint_every or max(math.ceil(total / 10), min(total, 10))
        log_every = config.log_every or min(20, max(1, total // 50))
        lr = config.lr if config.lr is not None else recipe.base_lr * config.batch_size * world / 16
        grad_clip = recipe.grad_clip if config.grad_clip is None else (config.grad_clip or None)
        return cls(per_epoch, total, milestones, min(config.warmup_iters, total // 4), checkpoint_every, log_every,
                   lr, grad_clip)

    def checkpoint_due(self, iteration: int) -> bool:
        """Whether the run validates and saves after ``iteration`` (also at its end)."""
        return iteration % self.checkpoint_every == 0 or iteration == self.total

    def log_due(self, iteration: int) -> bool:
        """Whether metrics.jsonl receives a training record after ``iteration``."""
        return iteration % self.log_every == 0 or iteration == self.total



@dataclass
class Run:
    """The fixed context of a run: what it is told and where it writes; the loop, the checkpoints
    and the callbacks read it (``state.run``)."""
    config: TrainConfig
    plan: Plan
    out_dir: str
    state_path: str
    train_ann: str
    val_ann: Optional[str]
    val_images: Optional[str]
    device: torch.device
    rank: int
    world: int
    amp_dtype: Optional[torch.dtype]
    stop: GracefulStop

    @property
    def main(self) -> bool:
        """Whether this process writes (rank 0)."""
        return self.rank == 0
