"""``fit``: the reference's training recipe as a small loop: SGD with linear or constant warm-up and
step decay, AMP, gradient clipping, torchrun DDP, exact resume, a guard against non-finite losses,
metrics in JSON lines and curves.

Three parts: ``TrainConfig`` (the run's settings), ``TrainState`` (everything a resumed run needs,
saved and loaded exactly) and ``train_loop`` (the iterations); ``fit`` wires them together.
"""
import json
import logging
import os
import random
import time
from collections import defaultdict, deque
from contextlib import nullcontext
from dataclasses import dataclass, fields, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from ..data import CocoDetection, Compose, GroupedBatchSampler, RandomHorizontalFlip, collate
from ..zoo.convert import _atomic, save_safetensors
from ..zoo.recipe import Recipe
from ..zoo.registry import get_arch_pretrained_cfgs, get_family
from .curves import plot_curves
from .evaluate import evaluate

logger = logging.getLogger("hrnetdet")

STATE_FILE = "training_state.pt"
METRICS_FILE = "metrics.jsonl"

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
        hflip: horizontal flip probability (the reference: 0.5).
        multiscale: training shorter-side choices, e.g. (640, 800) as the reference's ms configs;
            evaluation uses the last.
        filter_empty: drop training images without annotations (the reference's filter_empty_gt).
        checkpoint_every: iterations between checkpoints (and validations); default: every epoch
            with ``epochs``, a tenth of the run with ``iters``.
        log_every: iterations between the records of metrics.jsonl.
        max_nonfinite: stop after this many consecutive skipped (non-finite) losses.
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
    hflip: float = 0.5
    multiscale: Optional[Sequence[int]] = None
    filter_empty: bool = True
    num_workers: int = 0
    checkpoint_every: Optional[int] = None
    log_every: int = 10
    progress: bool = True
    max_nonfinite: int = 20

    def check(self) -> None:
        if (self.epochs is None) == (self.iters is None):
            raise ValueError("give exactly one of epochs or iters")
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
    lr: float
    grad_clip: Optional[float]

    @classmethod
    def resolve(cls, config: TrainConfig, per_epoch: int, world: int, recipe: Recipe, arch: str) -> "Plan":
        fractions = SCHEDULES[config.schedule or default_schedule(arch)]
        if config.epochs is not None:
            total = config.epochs * per_epoch
            milestones = tuple(round(f * config.epochs) * per_epoch for f in fractions)
            checkpoint_every = config.checkpoint_every or per_epoch
        else:
            total = config.iters
            milestones = tuple(round(f * total) for f in fractions)
            checkpoint_every = config.checkpoint_every or max(1, total // 10)
        lr = config.lr if config.lr is not None else recipe.base_lr * config.batch_size * world / 16
        grad_clip = recipe.grad_clip if config.grad_clip is None else (config.grad_clip or None)
        return cls(per_epoch, total, milestones, min(config.warmup_iters, total // 4), checkpoint_every, lr,
                   grad_clip)


def _rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                                                    *np_state[2:]),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, key, *rest = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class TrainState:
    """What a resumed run needs: model, optimizer, LR schedule, AMP scaler, the iteration, the best
    validation AP and the last validation metrics. RNG states are passed in by the caller (one per
    rank) and restored on load."""

    def __init__(self, model: nn.Module, config: TrainConfig, plan: Plan, recipe: Recipe,
                 amp_dtype: Optional[torch.dtype]):
        self.model = model
        self.optimizer = torch.optim.SGD(param_groups(model, plan.lr, config.weight_decay, recipe), lr=plan.lr,
                                         momentum=config.momentum, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda it: lr_factor(it, plan.milestones, plan.warmup_iters, recipe))
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
        self.iteration = 0
        self.best_ap = -1.0
        self.last_val: Dict[str, float] = {}

    def save(self, path: str, rng: List[Dict[str, Any]], total: int) -> None:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                 "iteration": self.iteration, "best_ap": self.best_ap, "rng": rng, "world_size": len(rng),
                 "total_iters": total}
        _atomic(path, lambda tmp: torch.save(state, tmp))

    def load(self, path: str, rank: int, world: int) -> None:
        """Restore from ``path``; the RNG streams too when the world size is unchanged."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.iteration, self.best_ap = int(state["iteration"]), float(state["best_ap"])
        if state["world_size"] == world:
            _set_rng_state(state["rng"][rank])
        elif rank == 0:
            logger.warning("resuming a %d-process run with %d processes: RNG streams restart",
                           state["world_size"], world)


def _setup_distributed(device: Optional[str]) -> Tuple[int, int, torch.device, bool]:
    """(rank, world size, device, whether we created the process group). torchrun sets WORLD_SIZE."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    created = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        created = True
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), dev, created
    return 0, 1, dev, created


def _amp_dtype(amp: Union[bool, str], device: torch.device) -> Optional[torch.dtype]:
    if not amp:
        return None
    if device.type != "cuda":
        raise ValueError(f"amp needs a CUDA device (got {device}); train in float32 on the CPU")
    if amp == "fp16":
        return torch.float16
    if amp in (True, "bf16"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    raise ValueError(f"amp must be True, False, 'bf16' or 'fp16', got {amp!r}")


def _to_device(targets: List[Dict[str, torch.Tensor]], device: torch.device) -> List[Dict[str, torch.Tensor]]:
    return [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]


class _Metrics:
    """Appends JSON lines (rank 0); on resume, drops the records after the resumed iteration."""

    def __init__(self, path: str, resume_iter: Optional[int], enabled: bool):
        self.path = path
        self.enabled = enabled
        if not enabled:
            return
        kept = []
        if resume_iter is not None and os.path.isfile(path):
            with open(path) as f:
                kept = [line for line in f if line.strip() and json.loads(line).get("iter", 0) <= resume_iter]
        _atomic(path, lambda tmp: open(tmp, "w").write("".join(kept)))

    def write(self, record: Dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


@dataclass
class _Run:
    """The fixed context of a run that the loop and the checkpoints read."""
    arch: str
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
    metrics: _Metrics


def checkpoint(run: _Run, state: TrainState) -> None:
    """Validate (rank 0, with a validation set), save last/ (and best/) and the training state."""
    rng = [_rng_state()] * run.world
    if run.world > 1:
        dist.all_gather_object(rng, _rng_state())
    if run.rank == 0:
        model, it = state.model, state.iteration
        extra = {"trained_on": os.path.basename(run.train_ann), "iteration": it}
        if run.val_ann is not None:
            model.eval()
            res = evaluate(model, run.val_ann, run.val_images, device=str(run.device), progress=False)
            model.train()
            state.last_val = {f"{t}_{k}": v for t in ("bbox", "segm") if t in res for k, v in res[t]["stats"].items()}
            run.metrics.write({"type": "val", "iter": it, **state.last_val})
            extra["val_metrics"] = state.last_val
            if state.last_val["bbox_AP"] > state.best_ap:
                state.best_ap = state.last_val["bbox_AP"]
                save_safetensors(model, os.path.join(run.out_dir, "best", "model.safetensors"), run.arch, extra)
        save_safetensors(model, os.path.join(run.out_dir, "last", "model.safetensors"), run.arch, extra)
        state.save(run.state_path, rng, run.plan.total)
        plot_curves(run.metrics.path, run.out_dir)
    if run.world > 1:
        dist.barrier()


def train_loop(run: _Run, state: TrainState, net: nn.Module, loader: torch.utils.data.DataLoader,
               sampler: GroupedBatchSampler, transforms: Optional[Compose]) -> int:
    """Train from ``state.iteration`` to the end of the plan, checkpointing on the way; returns the
    number of skipped (non-finite) steps."""
    config, plan, dev = run.config, run.plan, run.device
    main = run.rank == 0
    optimizer, scaler = state.optimizer, state.scaler
    params = [p for g in optimizer.param_groups for p in g["params"]]
    window: Dict[str, deque] = defaultdict(lambda: deque(maxlen=20))  # the progress bar's running means
    since_log: Dict[str, List[float]] = defaultdict(list)  # metrics.jsonl: means since the last record
    skipped, consecutive_bad = 0, 0
    bar = tqdm(total=plan.total, initial=state.iteration, disable=not (config.progress and main),
               dynamic_ncols=True, desc="train")
    t_log, it_log = time.time(), state.iteration
    try:
        while state.iteration < plan.total:
            epoch, first_batch = divmod(state.iteration, plan.per_epoch)
            sampler.set_epoch(epoch, first_batch)
            if transforms is not None:
                transforms.set_epoch(epoch)
            for images, targets in loader:
                images = [im.to(dev, non_blocking=True) for im in images]
                targets = _to_device(targets, dev)
                with torch.autocast(dev.type, dtype=run.amp_dtype) if run.amp_dtype else nullcontext():
                    losses = net(images, targets)
                loss = sum(losses.values())
                values = torch.stack([loss.detach().float()] + [v.detach().float() for v in losses.values()])
                if run.world > 1:
                    dist.all_reduce(values)
                    values /= run.world
                finite = bool(torch.isfinite(values).all())
                optimizer.zero_grad(set_to_none=True)
                # Every rank runs backward so that DDP's gradient hooks stay in step; a non-finite
                # loss (on any rank) is zeroed and the update skipped.
                scaler.scale(loss if finite else torch.nan_to_num(loss, 0.0, 0.0, 0.0) * 0).backward()
                it = state.iteration + 1
                if finite:
                    if plan.grad_clip:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(params, plan.grad_clip)
                    scaler.step(optimizer)
                    scaler.update()
                    consecutive_bad = 0
                else:
                    optimizer.zero_grad(set_to_none=True)
                    optimizer.step()  # no gradients, so nothing moves; keeps the scheduler's step order
                    skipped += 1
                    consecutive_bad += 1
                    record = {"type": "skip", "iter": it, **{k: v.item() for k, v in zip(["loss", *losses], values)}}
                    run.metrics.write(record)
                    if main:
                        logger.warning("non-finite loss at iteration %d skipped: %s", it, record)
                    if consecutive_bad >= config.max_nonfinite:
                        raise FloatingPointError(f"{consecutive_bad} consecutive non-finite losses (last at "
                                                 f"iteration {it}: {record}); lower the learning rate")
                state.scheduler.step()
                state.iteration = it
                if finite:
                    for k, v in zip(["loss", *losses], values.tolist()):
                        window[k].append(v)
                        since_log[k].append(v)
                bar.update(1)
                if main and window:
                    bar.set_postfix(loss=f"{np.mean(window['loss']):.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
                if (it % config.log_every == 0 or it == plan.total) and since_log:
                    now = time.time()
                    run.metrics.write({"type": "train", "iter": it, "epoch": it / plan.per_epoch,
                                       "lr": optimizer.param_groups[0]["lr"],
                                       **{k: float(np.mean(v)) for k, v in since_log.items()},
                                       "sec_per_iter": (now - t_log) / max(it - it_log, 1)})
                    t_log, it_log = now, it
                    since_log.clear()
                if it % plan.checkpoint_every == 0 or it == plan.total:
                    checkpoint(run, state)
                if it >= plan.total:
                    break
    finally:
        bar.close()
    return skipped


def fit(model: nn.Module, train_ann: str, train_images: str, val_ann: Optional[str] = None,
        val_images: Optional[str] = None, out_dir: str = "runs/train", config: Optional[TrainConfig] = None,
        **options: Any) -> Dict[str, Any]:
    """Train (or fine-tune) ``model`` on a COCO-format dataset with the reference's recipe.

    ``model`` comes from ``create_model`` (``model.arch`` picks the family's recipe); its class
    count must be the dataset's categories + 1, e.g. ``create_model(name, pretrained=True,
    num_classes=K + 1)`` to fine-tune COCO weights on K categories. The run's settings are a
    ``TrainConfig`` and/or its fields as keyword arguments (``iters=100, lr=0.01``).

    Under torchrun (``WORLD_SIZE`` > 1) each process trains a DDP replica (nccl on GPUs, gloo on
    the CPU) on its share of every batch; rank 0 writes. ``out_dir`` receives ``last/`` and
    ``best/`` (``model.safetensors`` + ``config.json``, loadable by ``create_model(arch,
    checkpoint_path=...)``; best by validation bbox AP, so only with a validation set),
    ``training_state.pt``, ``metrics.jsonl`` and ``loss.png``, ``lr.png``, ``ap.png``.

    Returns a summary: iterations, last/best paths, the last validation metrics, skipped steps.
    """
    unknown = set(options) - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise TypeError(f"fit() got unknown option(s) {sorted(unknown)}; see TrainConfig")
    config = replace(config or TrainConfig(), **options)
    config.check()
    if (val_ann is None) != (val_images is None):
        raise ValueError("val_ann and val_images go together")
    arch = getattr(model, "arch", None)
    if arch is None:
        raise ValueError("fit needs a model built by hrnetdet.create_model (model.arch names its family)")
    family, _ = get_family(arch)

    rank, world, dev, created_group = _setup_distributed(config.device)
    amp_dtype = _amp_dtype(config.amp, dev)
    random.seed(config.seed + rank)
    np.random.seed(config.seed + rank)
    torch.manual_seed(config.seed + rank)

    transforms = Compose([RandomHorizontalFlip(config.hflip, config.seed)]) if config.hflip > 0 else None
    ds = CocoDetection(train_ann, train_images, transforms=transforms, with_masks=family.has_masks,
                       filter_empty=config.filter_empty, min_image_size=32)
    if len(getattr(model, "categories", [])) != len(ds.categories):
        raise ValueError(f"the model has {len(model.categories)} classes (with background) but {train_ann} "
                         f"has {len(ds.categories) - 1} categories: build it with "
                         f"num_classes={len(ds.categories)}")
    model.categories = list(ds.categories)
    if config.multiscale is not None:
        model.transform.min_size = tuple(int(s) for s in config.multiscale)
    sampler = GroupedBatchSampler(ds.aspect_ratios(), config.batch_size, seed=config.seed, rank=rank,
                                  world_size=world)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate,
                                         num_workers=config.num_workers,
                                         generator=torch.Generator().manual_seed(config.seed))
    plan = Plan.resolve(config, len(sampler), world, family.recipe, arch)

    model.to(dev).train()
    state = TrainState(model, config, plan, family.recipe, amp_dtype)
    for sub in ("last", "best") if val_ann else ("last",):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    resume = config.resume
    state_path = resume if isinstance(resume, str) else os.path.join(out_dir, STATE_FILE)
    resumed = False
    if resume and os.path.isfile(state_path):
        state.load(state_path, rank, world)
        resumed = True
        if rank == 0:
            logger.info("resumed %s at iteration %d of %d", state_path, state.iteration, plan.total)
    elif resume and isinstance(resume, str):
        raise FileNotFoundError(f"training state to resume from not found: {resume}")
    elif resume and rank == 0:
        logger.info("no %s yet: starting from iteration 0", state_path)

    metrics = _Metrics(os.path.join(out_dir, METRICS_FILE), state.iteration if resumed else None, rank == 0)
    run = _Run(arch, config, plan, out_dir, state_path, train_ann, val_ann, val_images, dev, rank, world,
               amp_dtype, metrics)
    net = nn.parallel.DistributedDataParallel(
        model, device_ids=[dev.index] if dev.type == "cuda" else None,
        find_unused_parameters=True) if world > 1 else model
    try:
        skipped = train_loop(run, state, net, loader, sampler, transforms)
    finally:
        if created_group:
            dist.destroy_process_group()
    return {"iterations": state.iteration, "out_dir": out_dir,
            "last": os.path.join(out_dir, "last", "model.safetensors"),
            "best": os.path.join(out_dir, "best", "model.safetensors") if val_ann else None,
            "val": state.last_val, "skipped_steps": skipped, "lr": plan.lr, "milestones": list(plan.milestones)}
