"""The training loop: one step per batch (AMP, DDP's averaged losses, gradient clipping, the
non-finite guard) and the events that the callbacks (built-in and the user's) act on."""
import logging
import os
from contextlib import nullcontext
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn

from ..data import Augment, GroupedBatchSampler
from .callbacks import CallbackList
from .plan import Run
from .state import TrainState

logger = logging.getLogger("hrnetdet")


def setup_distributed(device: Optional[str]) -> Tuple[int, int, torch.device, bool]:
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


def resolve_amp_dtype(amp: Union[bool, str], device: torch.device) -> Optional[torch.dtype]:
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


def train_step(run: Run, state: TrainState, net: nn.Module, params: List[torch.Tensor],
               images: List[torch.Tensor], targets: List[Dict[str, torch.Tensor]]) -> Dict[str, float]:
    """One iteration: forward, backward, optimizer and scheduler steps; returns ``loss`` and each
    term averaged over the processes. A non-finite loss (on any process) is zeroed and the update
    skipped (``state.step_skipped``)."""
    dev, optimizer, scaler = run.device, state.optimizer, state.scaler
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
    # Every rank runs backward so that DDP's gradient hooks stay in step.
    scaler.scale(loss if finite else torch.nan_to_num(loss, 0.0, 0.0, 0.0) * 0).backward()
    if finite:
        if run.plan.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, run.plan.grad_clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.zero_grad(set_to_none=True)
        optimizer.step()  # no gradients, so nothing moves; keeps the scheduler's step order
    state.scheduler.step()
    state.iteration += 1
    state.step_skipped = not finite
    return dict(zip(["loss", *losses], values.tolist()))


def train_loop(run: Run, state: TrainState, net: nn.Module, loader: torch.utils.data.DataLoader,
               sampler: GroupedBatchSampler, augment: Augment, events: CallbackList) -> None:
    """Train from ``state.iteration`` to the end of the plan, an early stop or a stop request,
    calling the events; the callbacks validate and checkpoint on the way."""
    params = [p for g in state.optimizer.param_groups for p in g["params"]]
    consecutive_bad = 0
    try:
        events.fire("on_fit_start", state)
        while state.iteration < run.plan.total and not state.stopped_early and not run.stop.stopping:
            epoch, first_batch = divmod(state.iteration, run.plan.per_epoch)
            sampler.set_epoch(epoch, first_batch)
            augment.set_epoch(epoch)
            events.fire("on_epoch_start", state)
            for images, targets in loader:
                losses = train_step(run, state, net, params, images, targets)
                consecutive_bad = consecutive_bad + 1 if state.step_skipped else 0
                if state.step_skipped:
                    state.skipped_steps += 1
                    events.fire("on_step_skipped", state, losses)
                    _guard_nonfinite(run, state, losses, consecutive_bad)
                events.fire("on_step_end", state, losses)
                if state.iteration >= run.plan.total or state.stopped_early or run.stop.stopping:
                    break
    finally:
        events.fire("on_fit_end", state)


def _guard_nonfinite(run: Run, state: TrainState, losses: Dict[str, float], consecutive: int) -> None:
    """Warns of a skipped step; raises after ``config.max_nonfinite`` in a row."""
    record = {"type": "skip", "iter": state.iteration, **losses}
    if run.main:
        logger.warning("non-finite loss at iteration %d skipped: %s", state.iteration, record)
    if consecutive >= run.config.max_nonfinite:
        raise FloatingPointError(f"{consecutive} consecutive non-finite losses (last at iteration "
                                 f"{state.iteration}: {record}); lower the learning rate")
