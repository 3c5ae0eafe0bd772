"""The callbacks ``fit`` always installs, in this order around the user's:

    EMAUpdate, MetricsLogger, ProgressBar, BestCheckpoint, EarlyStopping, <user callbacks>,
    Validation, Checkpointer

so that at a checkpoint iteration the EMA is updated and the training record logged before the
weights are validated, best/ and the patience count follow the validation, a stop the user
requested in ``on_step_end`` or ``on_validation_end`` is saved at this iteration, and last/ is
saved last. Validation and saving leave the training RNG streams as they were (exact resume)."""
import logging
import os
import time
from collections import defaultdict, deque
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from ..zoo.checkpoint import save_pretrained
from .callbacks import Callback, CallbackList
from .checkpoints import naming_write_failures, provenance, save_last_and_state
from .curves import plot_curves
from .evaluate import evaluate
from .plan import Run
from .state import TrainState, training_rng_untouched

logger = logging.getLogger("hrnetdet")


class BuiltinCallback(Callback):
    name_errors = False


class EMAUpdate(BuiltinCallback):
    """Moves ``state.ema`` towards the model after each step that updated it."""

    def on_step_end(self, state: TrainState, losses: Dict[str, float]) -> None:
        if not state.step_skipped:
            state.ema.update_parameters(state.model)


class MetricsLogger(BuiltinCallback):
    """metrics.jsonl (and its TensorBoard mirror): a ``train`` record of the means since the last one
    every ``plan.log_every`` iterations, a ``skip`` record per non-finite step, a ``val`` record
    per validation; the curves redrawn at each checkpoint."""

    def __init__(self, run: Run, metrics: Any):
        self.run, self.metrics = run, metrics
        self.since_log: Dict[str, List[float]] = defaultdict(list)
        self.t_log, self.it_log = time.time(), 0

    def on_fit_start(self, state: TrainState) -> None:
        self.t_log, self.it_log = time.time(), state.iteration

    def on_step_skipped(self, state: TrainState, losses: Dict[str, float]) -> None:
        self.metrics.write({"type": "skip", "iter": state.iteration, **losses})

    def on_step_end(self, state: TrainState, losses: Dict[str, float]) -> None:
        it, plan = state.iteration, self.run.plan
        if not state.step_skipped:
            for k, v in losses.items():
                self.since_log[k].append(v)
        if plan.log_due(it) and self.since_log:
            now = time.time()
            self.metrics.write({"type": "train", "iter": it, "epoch": it / plan.per_epoch,
                                "lr": state.optimizer.param_groups[0]["lr"],
                                **{k: float(np.mean(v)) for k, v in self.since_log.items()},
                                "sec_per_iter": (now - self.t_log) / max(it - self.it_log, 1)})
            self.t_log, self.it_log = now, it
            self.since_log.clear()

    def on_validation_end(self, state: TrainState, metrics: Dict[str, float]) -> None:
        self.metrics.write({"type": "val", "iter": state.iteration, **metrics})

    def on_checkpoint(self, state: TrainState, path: str) -> None:
        self.metrics.flush()
        with naming_write_failures(f"the curves in {self.run.out_dir}"):
            plot_curves(self.metrics.path, self.run.out_dir)

    def on_fit_end(self, state: TrainState) -> None:
        self.metrics.close()


class ProgressBar(BuiltinCallback):
    """tqdm on rank 0 (``config.progress``) with the running mean loss of 20 steps and the LR."""

    def __init__(self, run: Run):
        self.run = run
        self.window: Dict[str, deque] = defaultdict(lambda: deque(maxlen=20))
        self.bar: Optional[tqdm] = None

    def on_fit_start(self, state: TrainState) -> None:
        self.bar = tqdm(total=self.run.plan.total, initial=state.iteration, dynamic_ncols=True, desc="train",
                        disable=not (self.run.config.progress and self.run.main))

    def on_step_end(self, state: TrainState, losses: Dict[str, float]) -> None:
        if not state.step_skipped:
            for k, v in losses.items():
                self.window[k].append(v)
        self.bar.update(1)
        if self.run.main and self.window:
            self.bar.set_postfix(loss=f"{np.mean(self.window['loss']):.3f}",
                                 lr=f"{state.optimizer.param_groups[0]['lr']:.2e}")

    def on_fit_end(self, state: TrainState) -> None:
        if self.bar is not None:
            self.bar.close()


class BestCheckpoint(BuiltinCallback):
    """best/: the weights of the best validation bbox AP so far; counts validations since."""

    def __init__(self, run: Run):
        self.run = run

    def on_validation_end(self, state: TrainState, metrics: Dict[str, float]) -> None:
        if metrics["bbox_AP"] > state.best_ap:
            state.best_ap, state.bad_validations = metrics["bbox_AP"], 0
            best = os.path.join(self.run.out_dir, "best")
            with naming_write_failures(best):
                save_pretrained(state.weights, best, {**provenance(self.run, state), "val_metrics": metrics})
        else:
            state.bad_validations += 1


class EarlyStopping(BuiltinCallback):
    """Ends the run for good (resume does not continue it) when bbox AP has not improved for
    ``patience`` validations."""

    def __init__(self, patience: int):
        self.patience = patience

    def on_validation_end(self, state: TrainState, metrics: Dict[str, float]) -> None:
        if state.bad_validations >= self.patience:
            state.stopped_early = True
            logger.info("early stop at iteration %d: bbox AP has not improved on %.4f for %d validations",
                        state.iteration, state.best_ap, state.bad_validations)


class Validation(BuiltinCallback):
    """Evaluates ``state.weights`` on the validation set at the plan's checkpoint iterations (rank
    0) and calls ``on_validation_end`` on every callback, the training RNG streams untouched."""

    def __init__(self, run: Run, events: CallbackList):
        self.run, self.events = run, events

    def on_step_end(self, state: TrainState, losses: Dict[str, float]) -> None:
        run = self.run
        if not run.main or run.val_ann is None or not run.plan.checkpoint_due(state.iteration):
            return
        with training_rng_untouched():
            res = evaluate(state.weights, run.val_ann, run.val_images, device=str(run.device), progress=False)
            state.last_val = {f"{t}_{k}": v for t in ("bbox", "segm") if t in res for k, v in res[t]["stats"].items()}
            state.validated_at = state.iteration
            self.events.fire("on_validation_end", state, dict(state.last_val))


class Checkpointer(BuiltinCallback):
    """Saves last/ and training_state.pt as a pair at the plan's checkpoint iterations and, at once,
    when the run is stopping (a signal on any process, or ``request_stop``): every process agrees
    on the iteration. Calls ``on_checkpoint`` on every callback (rank 0)."""

    def __init__(self, run: Run, events: CallbackList):
        self.run, self.events = run, events

    def on_step_end(self, state: TrainState, losses: Dict[str, float]) -> None:
        run = self.run
        stopping = run.stop.check(run.world, run.device, requested=state.stop_reason is not None)
        if not (run.plan.checkpoint_due(state.iteration) or stopping):
            return
        with training_rng_untouched() as own_rng:
            rng = [own_rng] * run.world
            if run.world > 1:
                dist.all_gather_object(rng, own_rng)
            if run.main:
                extra = provenance(run, state)
                if state.validated_at == state.iteration:
                    extra["val_metrics"] = state.last_val
                save_last_and_state(run, state, rng, extra)
                self.events.fire("on_checkpoint", state, os.path.join(run.out_dir, "last"))
            if run.world > 1:
                stop = torch.tensor([int(state.stopped_early)], device=run.device if run.device.type == "cuda" else None)
                dist.broadcast(stop, 0)
                state.stopped_early = bool(stop.item())
                dist.barrier()


def builtin_callbacks(run: Run, metrics: Any, user: List[Callback]) -> CallbackList:
    """The callbacks of a run in their order (see the module's docstring)."""
    events = CallbackList()
    events.extend([EMAUpdate()] if run.config.ema is not None else [])
    events.extend([MetricsLogger(run, metrics), ProgressBar(run)])
    events.extend([BestCheckpoint(run)] if run.val_ann is not None else [])
    events.extend([EarlyStopping(run.config.patience)] if run.config.patience is not None else [])
    events.extend([*user, Validation(run, events), Checkpointer(run, events)])
    return events
