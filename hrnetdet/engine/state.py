"""What a resumed run needs, saved and loaded exactly: ``TrainState`` (model, EMA, optimizer,
schedule, scaler, iteration, validation bookkeeping) and the RNG streams, which validation and
checkpointing leave untouched so that a resumed run repeats a straight one bit for bit."""
import logging
import os
import pickle
import random
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from ..io import atomic_write
from ..zoo.recipe import Recipe
from .plan import Plan, Run, TrainConfig, lr_factor, param_groups

logger = logging.getLogger("hrnetdet")


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
    states are passed in by the caller (one per rank) and restored on load.

    It is also what callbacks see: besides the above, ``run`` (the run's fixed context: config,
    plan, out_dir, rank, world, device), ``epoch``, ``step_skipped``, ``skipped_steps`` and
    ``request_stop``; these are not saved."""

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
        self.run: Optional[Run] = None  # set by fit
        self.step_skipped = False  # the last step's loss was non-finite: no update was made
        self.skipped_steps = 0  # in this process's part of the run
        self.validated_at: Optional[int] = None  # the iteration ``last_val`` was measured at, in this process
        self.stop_reason: Optional[str] = None

    @property
    def weights(self) -> nn.Module:
        """The weights that are validated and saved: the EMA's when there is one."""
        return self.ema.module if self.ema is not None else self.model

    @property
    def epoch(self) -> int:
        """Whole passes over the training data done."""
        return self.iteration // self.run.plan.per_epoch

    def request_stop(self, reason: str) -> None:
        """End the run after this iteration as Ctrl-C does, but without an error: last/ and the
        training state are saved at this iteration, ``fit`` returns (``stop_reason`` in its
        summary) and ``resume=True`` continues the run."""
        self.stop_reason = reason

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
