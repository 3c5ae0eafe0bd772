"""``fit``: the reference's training recipe as a small loop: SGD with linear or constant warm-up and
step decay, AMP, gradient clipping, torchrun DDP, exact resume (also after Ctrl-C or SIGTERM), a
guard against non-finite losses, EMA weights, early stopping, metrics in JSON lines, CSV and
TensorBoard, and curves. The recipe:
docs/NUMERICS.md, 'Training recipe'.

Three parts: ``TrainConfig`` (the run's settings), ``TrainState`` (everything a resumed run needs,
saved and loaded exactly) and ``train_loop`` (the iterations); ``fit`` wires them together.
"""
import json
import logging
import math
import os
import pickle
import random
import re
import shutil
import time
from collections import defaultdict, deque
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields, replace
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from ..data import Augment, CocoDetection, GroupedBatchSampler, collate
from ..io import atomic_write, atomic_write_text, open_no_follow
from ..zoo.checkpoint import save_pretrained
from ..zoo.recipe import Recipe
from ..zoo.registry import get_arch_pretrained_cfgs, get_family
from .curves import plot_curves
from .evaluate import evaluate
from .interrupt import GracefulStop, TrainingInterrupted, ignore_stop_signals

logger = logging.getLogger("hrnetdet")

STATE_FILE = "training_state.pt"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"

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


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators: call it before building the model, so that
    two identical runs start from identical weights."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


@contextmanager
def training_rng_untouched() -> Iterator[Dict[str, Any]]:
    """Yields the RNG states and restores them on exit: evaluation (its DataLoader draws a seed)
    and checkpointing inside do not move the training streams, so a resumed run repeats them."""
    state = _rng_state()
    try:
        yield state
    finally:
        _set_rng_state(state)


def ema_of(model: nn.Module, decay: float) -> AveragedModel:
    """torch's AveragedModel as an exponential moving average of parameters and buffers, its decay
    ramped up as ``min(decay, (1 + n) / (10 + n))`` after n updates (timm's ModelEmaV3 warm-up),
    so that short fine-tunes are not dominated by the initial weights."""
    def update(averaged: List[torch.Tensor], current: List[torch.Tensor], num_averaged: torch.Tensor) -> None:
        if not averaged[0].is_floating_point():  # BatchNorm's num_batches_tracked
            torch._foreach_copy_(averaged, current)
            return
        n = float(num_averaged)
        torch._foreach_lerp_(averaged, current, 1.0 - min(decay, (1.0 + n) / (10.0 + n)))
    return AveragedModel(model, multi_avg_fn=update, use_buffers=True)


class TrainingStateError(RuntimeError):
    """training_state.pt cannot be read (e.g. truncated by a full disk)."""


class TrainState:
    """What a resumed run needs: model, EMA, optimizer, LR schedule, AMP scaler, the iteration, the
    best validation AP, validations without improvement and the last validation metrics. RNG
    states are passed in by the caller (one per rank) and restored on load."""

    def __init__(self, model: nn.Module, config: TrainConfig, plan: Plan, recipe: Recipe,
                 amp_dtype: Optional[torch.dtype]):
        self.model = model
        self.ema = ema_of(model, config.ema) if config.ema is not None else None
        self.optimizer = torch.optim.SGD(param_groups(model, plan.lr, config.weight_decay, recipe), lr=plan.lr,
                                         momentum=config.momentum, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda it: lr_factor(it, plan.milestones, plan.warmup_iters, recipe))
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
        self.iteration = 0
        self.best_ap = -1.0
        self.bad_validations = 0  # since the best one
        self.stopped_early = False
        self.last_val: Dict[str, float] = {}

    @property
    def weights(self) -> nn.Module:
        """The weights that are validated and saved: the EMA's when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def save(self, path: str, rng: List[Dict[str, Any]], total: int) -> None:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                 "iteration": self.iteration, "best_ap": self.best_ap, "bad_validations": self.bad_validations,
                 "stopped_early": self.stopped_early, "last_val": self.last_val, "rng": rng,
                 "world_size": len(rng), "total_iters": total}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        atomic_write(path, lambda tmp: torch.save(state, tmp))

    def load(self, path: str, rank: int, world: int) -> None:
        """Restore from ``path``; the RNG streams too when the world size is unchanged."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:
            last = os.path.join(os.path.dirname(os.path.abspath(path)), "last", "model.safetensors")
            fallback = (f"the last checkpoint's weights are in {last}: start a new run from them (--checkpoint "
                        f"{last})" if os.path.isfile(last) else "no last/ checkpoint exists either")
            raise TrainingStateError(f"cannot resume: {path} is unreadable ({str(e).splitlines()[0]}); {fallback}, "
                                     f"or delete {path} to train from the start") from e
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            if "ema" not in state:
                raise TrainingStateError(f"{path} was saved without EMA weights: resume without ema")
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.iteration, self.best_ap = int(state["iteration"]), float(state["best_ap"])
        self.bad_validations, self.stopped_early = int(state["bad_validations"]), bool(state["stopped_early"])
        self.last_val = dict(state["last_val"])
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


def _tensorboard_writer(log_dir: str, purge_step: Optional[int]) -> Any:
    """A SummaryWriter when the optional ``tensorboard`` package is installed, else None."""
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
    except ImportError:
        logger.info("TensorBoard logs need the optional extra: pip install 'hrnetdet[tensorboard]'")
        return None
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(log_dir, purge_step=purge_step)


class _Metrics:
    """Appends JSON lines (rank 0), mirrored as TensorBoard scalars when tensorboard is installed;
    on resume, drops the records after the resumed iteration (TensorBoard: its purge_step)."""

    def __init__(self, out_dir: str, resume_iter: Optional[int], enabled: bool):
        self.path = os.path.join(out_dir, METRICS_FILE)
        self.enabled = enabled
        self.tensorboard = None
        if not enabled:
            return
        kept = self._records_until(resume_iter) if resume_iter is not None and os.path.isfile(self.path) else []
        with naming_write_failures(self.path):
            atomic_write_text(self.path, "".join(kept))
        self.tensorboard = _tensorboard_writer(os.path.join(out_dir, TENSORBOARD_DIR),
                                               resume_iter + 1 if resume_iter else None)

    def _records_until(self, resume_iter: int) -> List[str]:
        """The lines up to the resumed iteration; lines that do not parse (the last one torn by a
        kill or a full disk) are dropped and said so."""
        kept, torn = [], []
        with open(self.path) as f:
            for number, line in enumerate(f, 1):
                try:
                    record = json.loads(line) if line.strip() else {}
                    if not isinstance(record, dict):
                        raise ValueError(record)
                except ValueError:
                    torn.append(number)
                    continue
                if record and record.get("iter", 0) <= resume_iter:
                    kept.append(line.rstrip("\n") + "\n")
        if torn:
            logger.warning("%s: dropped unreadable line(s) %s (torn when the run was stopped); kept %d records",
                           self.path, ", ".join(map(str, torn)), len(kept))
        return kept

    def write(self, record: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        with naming_write_failures(self.path), open_no_follow(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if key not in ("type", "iter") and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(f"{record['type']}/{key}", value, record["iter"])

    def flush(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def remove_orphan_temporaries(folders: Sequence[str]) -> List[str]:
    """Delete the ``*.tmp<pid>`` files and staged folders that a killed process left behind (their
    process is gone); returns their paths."""
    removed = []
    for folder in folders:
        for name in os.listdir(folder) if os.path.isdir(folder) else []:
            match = re.search(r"\.tmp(\d+)$", name)
            if match and not _process_alive(int(match.group(1))):
                path = os.path.join(folder, name)
                shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
                removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a file of ours from a previous process that had our pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class _Run:
    """The fixed context of a run that the loop and the checkpoints read."""
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
    stop: GracefulStop


def checkpoint(run: _Run, state: TrainState, validate: bool = True) -> None:
    """Validate (rank 0, with a validation set, unless ``validate`` is False), save last/ (and
    best/) and the training state, leaving the training RNG streams as they were; decides early
    stopping."""
    with training_rng_untouched() as own_rng:
        rng = [own_rng] * run.world
        if run.world > 1:
            dist.all_gather_object(rng, own_rng)
        if run.rank == 0:
            _validate_and_save(run, state, rng, validate)
        if run.world > 1:
            stop = torch.tensor([int(state.stopped_early)], device=run.device if run.device.type == "cuda" else None)
            dist.broadcast(stop, 0)
            state.stopped_early = bool(stop.item())
            dist.barrier()


@contextmanager
def naming_write_failures(path: str, note: str = "") -> Iterator[None]:
    """An OSError while writing ``path`` (a full disk, a read-only folder) names it: torch and
    safetensors raise theirs without the file's name."""
    try:
        yield
    except OSError as e:
        raise OSError(e.errno, f"{e.strerror or e}: cannot write {path}{note}") from e


def _provenance(run: _Run, state: TrainState) -> Dict[str, Any]:
    """What last/ and best/ record beside the weights, the iteration first: resume checks it."""
    extra: Dict[str, Any] = {"trained_on": os.path.basename(run.train_ann), "iteration": state.iteration}
    if state.ema is not None:
        extra["ema_decay"] = run.config.ema
    return extra


def save_last_and_state(run: _Run, state: TrainState, rng: List[Dict[str, Any]], extra: Dict[str, Any]) -> None:
    """last/ and training_state.pt as a pair at one iteration: last/ is written into a folder beside
    it, then the state, and only then are last/'s files renamed in (renames need no space), so a
    full disk leaves the previous pair whole; a kill between the renames is mended on resume
    (``mend_last``)."""
    last = os.path.join(run.out_dir, "last")
    staged = f"{last}.tmp{os.getpid()}"
    previous = _last_iteration(last)
    kept = "" if previous is None else f" (the checkpoint of iteration {previous} is kept: resume from it)"
    try:
        with naming_write_failures(last, kept):
            save_pretrained(state.weights, staged, extra)
        with naming_write_failures(run.state_path, kept):
            state.save(run.state_path, rng, run.plan.total)
        for name in os.listdir(staged):
            os.replace(os.path.join(staged, name), os.path.join(last, name))
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def _last_iteration(last: str) -> Optional[int]:
    """The iteration that last/config.json records (None without one)."""
    try:
        with open(os.path.join(last, "config.json")) as f:
            return json.load(f).get("iteration")
    except (OSError, ValueError):
        return None


def mend_last(run: _Run, state: TrainState) -> None:
    """Rewrite last/ from the resumed state when it records another iteration (the process was
    killed between the state's write and last/'s): the state is what the run continues from."""
    last = os.path.join(run.out_dir, "last")
    found = _last_iteration(last)
    if found != state.iteration:
        logger.warning("%s was at iteration %s, %s at %d: rewrote last/ from the training state", last, found,
                       run.state_path, state.iteration)
        with naming_write_failures(last):
            save_pretrained(state.weights, last, _provenance(run, state))


def _validate_and_save(run: _Run, state: TrainState, rng: List[Dict[str, Any]], validate: bool) -> None:
    weights, it = state.weights, state.iteration
    extra = _provenance(run, state)
    if validate and run.val_ann is not None:
        res = evaluate(weights, run.val_ann, run.val_images, device=str(run.device), progress=False)
        state.last_val = {f"{t}_{k}": v for t in ("bbox", "segm") if t in res for k, v in res[t]["stats"].items()}
        run.metrics.write({"type": "val", "iter": it, **state.last_val})
        extra["val_metrics"] = state.last_val
        if state.last_val["bbox_AP"] > state.best_ap:
            state.best_ap, state.bad_validations = state.last_val["bbox_AP"], 0
            with naming_write_failures(os.path.join(run.out_dir, "best")):
                save_pretrained(weights, os.path.join(run.out_dir, "best"), extra)
        else:
            state.bad_validations += 1
        if run.config.patience is not None and state.bad_validations >= run.config.patience:
            state.stopped_early = True
            logger.info("early stop at iteration %d: bbox AP has not improved on %.4f for %d validations",
                        it, state.best_ap, state.bad_validations)
    save_last_and_state(run, state, rng, extra)
    run.metrics.flush()
    with naming_write_failures(f"the curves in {run.out_dir}"):
        plot_curves(run.metrics.path, run.out_dir)


def train_loop(run: _Run, state: TrainState, net: nn.Module, loader: torch.utils.data.DataLoader,
               sampler: GroupedBatchSampler, augment: Augment) -> int:
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
        while state.iteration < plan.total and not state.stopped_early and not run.stop.stopping:
            epoch, first_batch = divmod(state.iteration, plan.per_epoch)
            sampler.set_epoch(epoch, first_batch)
            augment.set_epoch(epoch)
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
                    if state.ema is not None:
                        state.ema.update_parameters(state.model)
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
                if (it % plan.log_every == 0 or it == plan.total) and since_log:
                    now = time.time()
                    run.metrics.write({"type": "train", "iter": it, "epoch": it / plan.per_epoch,
                                       "lr": optimizer.param_groups[0]["lr"],
                                       **{k: float(np.mean(v)) for k, v in since_log.items()},
                                       "sec_per_iter": (now - t_log) / max(it - it_log, 1)})
                    t_log, it_log = now, it
                    since_log.clear()
                stopping = run.stop.check(run.world, dev)
                if it % plan.checkpoint_every == 0 or it == plan.total:
                    checkpoint(run, state)
                elif stopping:  # saved at once: a scheduler's grace period is short
                    checkpoint(run, state, validate=False)
                if it >= plan.total or state.stopped_early or stopping:
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
    ``training_state.pt``, ``metrics.jsonl``, ``metrics.csv``, ``tensorboard/`` (when tensorboard
    is installed) and ``loss.png``, ``lr.png``, ``ap.png``. Seed with ``seed_everything`` before
    building the model for runs that repeat exactly.

    last/ and training_state.pt always record the same iteration (a full disk leaves the previous
    pair and ends with an OSError naming the file). SIGINT (Ctrl-C) or SIGTERM ends the current
    iteration, saves both and raises ``TrainingInterrupted``; ``resume=True`` continues from there.

    Returns a summary: iterations, last/best paths, the last validation metrics (also when
    resuming a finished run), skipped steps, whether it stopped early.
    """
    unknown = set(options) - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise TypeError(f"fit() got unknown option(s) {sorted(unknown)}; see TrainConfig")
    config = replace(config or TrainConfig(), **options)
    config.check()
    if (val_ann is None) != (val_images is None):
        raise ValueError("val_ann and val_images go together")
    if config.patience is not None and val_ann is None:
        raise ValueError("patience (early stopping on validation AP) needs a validation set")
    arch = getattr(model, "arch", None)
    if arch is None:
        raise ValueError("fit needs a model built by hrnetdet.create_model (model.arch names its family)")
    family, _ = get_family(arch)

    rank, world, dev, created_group = _setup_distributed(config.device)
    amp_dtype = _amp_dtype(config.amp, dev)
    seed_everything(config.seed + rank)

    augment = Augment(config.aug, config.seed)
    ds = CocoDetection(train_ann, train_images, transforms=augment, with_masks=family.has_masks,
                       filter_empty=config.filter_empty, min_image_size=32)
    if len(getattr(model, "categories", [])) != len(ds.categories):
        raise ValueError(f"the model has {len(model.categories)} classes (with background) but {train_ann} "
                         f"has {len(ds.categories) - 1} categories: build it with "
                         f"num_classes={len(ds.categories)}")
    model.categories = list(ds.categories)
    model.category_ids = [None, *ds.cat_ids]
    if config.multiscale is not None:
        model.transform.min_size = tuple(int(s) for s in config.multiscale)
    sampler = GroupedBatchSampler(ds.aspect_ratios(), config.batch_size, seed=config.seed, rank=rank,
                                  world_size=world)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate,
                                         num_workers=config.num_workers, worker_init_fn=ignore_stop_signals,
                                         generator=torch.Generator().manual_seed(config.seed))
    plan = Plan.resolve(config, len(sampler), world, family.recipe, arch)

    if config.grad_checkpoint:
        model.backbone.body.set_grad_checkpointing(True)
    model.to(dev).train()
    state = TrainState(model, config, plan, family.recipe, amp_dtype)
    folders = [os.path.join(out_dir, sub) for sub in (("last", "best") if val_ann else ("last",))]
    for folder in folders:
        os.makedirs(folder, exist_ok=True)
    if rank == 0:
        for path in remove_orphan_temporaries([out_dir, *folders]):
            logger.info("removed %s, left by an interrupted process", path)
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

    metrics = _Metrics(out_dir, state.iteration if resumed else None, rank == 0)
    run = _Run(config, plan, out_dir, state_path, train_ann, val_ann, val_images, dev, rank, world,
               amp_dtype, metrics, GracefulStop())
    if resumed and rank == 0:
        mend_last(run, state)
    net = nn.parallel.DistributedDataParallel(
        model, device_ids=[dev.index] if dev.type == "cuda" else None,
        find_unused_parameters=True) if world > 1 else model
    try:
        with run.stop:
            skipped = train_loop(run, state, net, loader, sampler, augment)
    finally:
        metrics.close()
        if created_group:
            dist.destroy_process_group()
    if run.stop.stopping and state.iteration < plan.total:
        message = (f"stopped by {run.stop.name} at iteration {state.iteration} of {plan.total}: {state_path} "
                   f"and last/ saved; resume to continue")
        if rank == 0:
            logger.info(message)
        raise TrainingInterrupted(message)
    return {"iterations": state.iteration, "out_dir": out_dir,
            "last": os.path.join(out_dir, "last", "model.safetensors"),
            "best": os.path.join(out_dir, "best", "model.safetensors") if val_ann else None,
            "val": state.last_val, "best_bbox_AP": state.best_ap if val_ann else None,
            "stopped_early": state.stopped_early, "skipped_steps": skipped, "lr": plan.lr,
            "milestones": list(plan.milestones)}
