"""``fit``: the reference's training recipe as a small loop with callbacks: SGD with linear or
constant warm-up and step decay, AMP, gradient clipping, torchrun DDP, exact resume (also after
Ctrl-C or SIGTERM), a guard against non-finite losses, EMA weights, early stopping, metrics in JSON
lines, CSV and TensorBoard, and curves. The recipe: docs/NUMERICS.md, 'Training recipe'; the
callbacks: docs/TRAINING.md.

Where each concern lives: ``plan`` (settings, schedule), ``state`` (what a resume needs, RNG),
``checkpoints`` (last/ + state as a pair, orphan temporaries), ``loop`` (the step, DDP, AMP),
``callbacks`` (the user's hooks) and ``builtin_callbacks`` (validation, checkpointing, EMA,
metrics, progress, early stopping); this module wires them together and writes metrics.jsonl.
"""
import json
import logging
import os
from dataclasses import fields, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn

from ..data import Augment, CocoDetection, GroupedBatchSampler, collate
from ..detectors.settings import set_settings
from ..io import atomic_write_text, open_no_follow
from ..zoo.registry import get_family
from .builtin_callbacks import builtin_callbacks
from .callbacks import Callback, CallbackList
from .checkpoints import mend_last, naming_write_failures, remove_orphan_temporaries
from .interrupt import GracefulStop, TrainingInterrupted, ignore_stop_signals
from .loop import resolve_amp_dtype, setup_distributed, train_loop
from .plan import SCHEDULES, Plan, Run, TrainConfig, default_schedule, lr_factor, param_groups
from .state import TrainingStateError, TrainState, seed_everything

__all__ = ["SCHEDULES", "Callback", "Plan", "TrainConfig", "TrainState", "TrainingStateError", "default_schedule",
           "fit", "lr_factor", "param_groups", "seed_everything"]

logger = logging.getLogger("hrnetdet")

STATE_FILE = "training_state.pt"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


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


def fit(model: nn.Module, train_ann: str, train_images: str, val_ann: Optional[str] = None,
        val_images: Optional[str] = None, out_dir: str = "runs/train", config: Optional[TrainConfig] = None,
        callbacks: Sequence[Callback] = (), **options: Any) -> Dict[str, Any]:
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

    ``callbacks``: ``Callback`` instances called at each event of the loop after the built-in
    ones (docs/TRAINING.md, 'Callbacks'); one may end the run with ``state.request_stop``.

    last/ and training_state.pt always record the same iteration (a full disk leaves the previous
    pair and ends with an OSError naming the file). SIGINT (Ctrl-C) or SIGTERM ends the current
    iteration, saves both and raises ``TrainingInterrupted``; ``resume=True`` continues from there.

    Returns a summary: iterations, last/best paths, the last validation metrics (also when
    resuming a finished run), skipped steps, whether it stopped early, a callback's stop reason.
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
    user_callbacks = CallbackList(callbacks).callbacks  # refused before any work when not Callbacks

    rank, world, dev, created_group = setup_distributed(config.device)
    amp_dtype = resolve_amp_dtype(config.amp, dev)
    seed_everything(config.seed + rank)

    augment, sampler, loader = _training_data(model, family.has_masks, config, train_ann, train_images, rank, world)
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
    state_path = config.resume if isinstance(config.resume, str) else os.path.join(out_dir, STATE_FILE)
    resumed = _resume(state, config.resume, state_path, plan.total, rank, world)

    run = Run(config, plan, out_dir, state_path, train_ann, val_ann, val_images, dev, rank, world, amp_dtype,
              GracefulStop())
    state.run = run
    if resumed and rank == 0:
        mend_last(run, state)
    events = builtin_callbacks(run, _Metrics(out_dir, state.iteration if resumed else None, rank == 0),
                               user_callbacks)
    net = nn.parallel.DistributedDataParallel(
        model, device_ids=[dev.index] if dev.type == "cuda" else None,
        find_unused_parameters=True) if world > 1 else model
    try:
        with run.stop:
            train_loop(run, state, net, loader, sampler, augment, events)
    finally:
        if created_group:
            dist.destroy_process_group()
    if run.stop.signalled and state.iteration < plan.total:
        message = (f"stopped by {run.stop.name} at iteration {state.iteration} of {plan.total}: {state_path} "
                   f"and last/ saved; resume to continue")
        if rank == 0:
            logger.info(message)
        raise TrainingInterrupted(message)
    return {"iterations": state.iteration, "out_dir": out_dir,
            "last": os.path.join(out_dir, "last", "model.safetensors"),
            "best": os.path.join(out_dir, "best", "model.safetensors") if val_ann else None,
            "val": state.last_val, "best_bbox_AP": state.best_ap if val_ann else None,
            "stopped_early": state.stopped_early, "skipped_steps": state.skipped_steps, "lr": plan.lr,
            "milestones": list(plan.milestones), "stop_reason": _stop_reason(run, state)}


def _training_data(model: nn.Module, has_masks: bool, config: TrainConfig, train_ann: str, train_images: str,
                   rank: int, world: int) -> Tuple[Augment, GroupedBatchSampler, torch.utils.data.DataLoader]:
    """The augmentation, this process's batch sampler and the loader; the model learns the
    dataset's categories (and the training sizes of multiscale)."""
    augment = Augment(config.aug, config.seed)
    ds = CocoDetection(train_ann, train_images, transforms=augment, with_masks=has_masks,
                       filter_empty=config.filter_empty, min_image_size=32)
    if len(getattr(model, "categories", [])) != len(ds.categories):
        raise ValueError(f"the model has {len(model.categories)} classes (with background) but {train_ann} "
                         f"has {len(ds.categories) - 1} categories: build it with "
                         f"num_classes={len(ds.categories)}")
    model.categories = list(ds.categories)
    model.category_ids = [None, *ds.cat_ids]
    if config.multiscale is not None:
        set_settings(model, min_size=tuple(config.multiscale))
    sampler = GroupedBatchSampler(ds.aspect_ratios(), config.batch_size, seed=config.seed, rank=rank,
                                  world_size=world)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate,
                                         num_workers=config.num_workers, worker_init_fn=ignore_stop_signals,
                                         generator=torch.Generator().manual_seed(config.seed))
    return augment, sampler, loader


def _resume(state: TrainState, resume: Union[bool, str], state_path: str, total: int, rank: int, world: int) -> bool:
    """Loads ``state_path`` into ``state`` when resuming and it exists; whether it did."""
    if resume and os.path.isfile(state_path):
        state.load(state_path, rank, world)
        if rank == 0:
            logger.info("resumed %s at iteration %d of %d", state_path, state.iteration, total)
        return True
    if resume and isinstance(resume, str):
        raise FileNotFoundError(f"training state to resume from not found: {resume}")
    if resume and rank == 0:
        logger.info("no %s yet: starting from iteration 0", state_path)
    return False


def _stop_reason(run: Run, state: TrainState) -> Optional[str]:
    """Why a callback ended the run before its plan (None when it ran to the end or stopped early)."""
    if not run.stop.stopping or state.iteration >= run.plan.total:
        return None
    return state.stop_reason or "a callback in another process requested a stop"
