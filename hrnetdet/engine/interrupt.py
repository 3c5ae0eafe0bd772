"""A graceful stop for training: SIGINT (Ctrl-C) and SIGTERM (what schedulers send before they kill
a job) end the current iteration instead of the process, so that the loop saves a resumable state
first; a second signal stops at once."""
import signal
import threading
from types import FrameType
from typing import Dict, Optional

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by a signal, after saving a state it can resume from."""


def ignore_stop_signals(_worker_id: int) -> None:
    """A DataLoader worker's ``worker_init_fn``: Ctrl-C reaches the whole process group, and a worker
    it killed would fail the loop before it could save; the training process decides when to stop."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


class GracefulStop:
    """While entered (in the main thread), a stop signal only records itself; ``check`` tells the
    loop, at the end of an iteration, whether any process was signalled."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self.stopping = False
        self.signalled = False
        self._previous: Dict[int, object] = {}

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():  # signal.signal works there only
            self._previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, _frame: Optional[FrameType]) -> None:
        if self.signum is not None:
            self.__exit__()
            raise KeyboardInterrupt(f"a second {signal.Signals(signum).name}: stopped without saving")
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "another process's signal"

    def check(self, world: int, device: torch.device, requested: bool = False) -> bool:
        """Whether to stop now: a signal, or a stop ``requested`` by a callback; under DDP every
        process stops at the same iteration. ``signalled`` says whether a signal was among them."""
        flags = [self.signum is not None, requested]
        if world > 1:
            votes = torch.tensor([int(f) for f in flags], device=device if device.type == "cuda" else None)
            dist.all_reduce(votes, op=dist.ReduceOp.MAX)
            flags = [bool(v) for v in votes.tolist()]
        self.signalled, self.stopping = flags[0], any(flags)
        return self.stopping
