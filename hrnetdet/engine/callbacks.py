"""Hooks into ``fit``'s loop: subclass ``Callback``, override the events you need and pass
instances as ``fit(..., callbacks=[...])``. Validation, checkpointing, EMA, metrics logging, the
progress bar and early stopping are built-in callbacks on the same events
(``builtin_callbacks.py``); docs/TRAINING.md, 'Callbacks', lists the events and their order."""
from typing import TYPE_CHECKING, Dict, Iterable, List

if TYPE_CHECKING:  # the state module does not need this one: no import at run time
    from .state import TrainState

EVENTS = ("on_fit_start", "on_epoch_start", "on_step_skipped", "on_step_end", "on_validation_end", "on_checkpoint",
          "on_fit_end")


class Callback:
    """A no-op for every event; override those you need. Each gets the ``TrainState``
    (``state.iteration``, ``state.epoch``, ``state.model``, ``state.weights``, ``state.optimizer``,
    ``state.last_val``, ``state.run.config`` / ``.plan`` / ``.out_dir`` / ``.rank`` ...) and
    runs in every process, except ``on_validation_end`` and ``on_checkpoint`` (rank 0 only, where
    validation and saving happen). Call ``state.request_stop(reason)`` to end the run after this
    iteration with a resumable checkpoint.

    Exact resume repeats the random streams of a straight run: draw random numbers in
    ``on_validation_end`` or ``on_checkpoint`` (their streams are restored afterwards) or from
    your own generator, never from the global ones in the other events.
    """

    def on_fit_start(self, state: "TrainState") -> None:
        """Once, before the first iteration (of this process: a resumed run starts at ``state.iteration``)."""

    def on_epoch_start(self, state: "TrainState") -> None:
        """When a pass over the training data starts, or resumes part way (``state.epoch``)."""

    def on_step_skipped(self, state: "TrainState", losses: Dict[str, float]) -> None:
        """After an iteration whose loss was not finite (on any process): no update was made.
        ``on_step_end`` follows."""

    def on_step_end(self, state: "TrainState", losses: Dict[str, float]) -> None:
        """After every iteration: optimizer and LR scheduler stepped, ``state.iteration`` counts
        it (1 after the first). ``losses``: ``loss`` (the total) and each term, averaged over the
        processes; ``state.step_skipped`` says whether they were non-finite."""

    def on_validation_end(self, state: "TrainState", metrics: Dict[str, float]) -> None:
        """Rank 0, after each validation (at the plan's checkpoint iterations, with a validation
        set), before the checkpoint is saved: ``metrics`` as ``bbox_AP``, ``bbox_AP50``, ...,
        ``segm_AP`` ... (also ``state.last_val``)."""

    def on_checkpoint(self, state: "TrainState", path: str) -> None:
        """Rank 0, after last/ (``path``) and training_state.pt are saved at ``state.iteration``
        (at the plan's checkpoint iterations, the last one and when the run stops)."""

    def on_fit_end(self, state: "TrainState") -> None:
        """Once, when the loop ends: finished, stopped early, interrupted, or failed (then the
        error propagates after this): release what ``on_fit_start`` opened."""

    name_errors = True  # False for the built-ins: their errors already name the file or setting


class CallbackError(RuntimeError):
    """A user callback raised: the message names it, the event and the iteration; the original
    exception is the ``__cause__``."""


class CallbackList:
    """Calls an event on each callback in order."""

    def __init__(self, callbacks: Iterable[Callback] = ()):
        self.callbacks: List[Callback] = []
        self.extend(callbacks)

    def extend(self, callbacks: Iterable[Callback]) -> None:
        for callback in callbacks:
            if not isinstance(callback, Callback):
                raise TypeError(f"callbacks must be hrnetdet.engine.Callback instances, got {type(callback).__name__}")
            self.callbacks.append(callback)

    def fire(self, event: str, state: "TrainState", *args: object) -> None:
        for callback in self.callbacks:
            try:
                getattr(callback, event)(state, *args)
            except Exception as e:
                if not callback.name_errors or isinstance(e, CallbackError):
                    raise
                detail = (str(e).splitlines() or [""])[0]
                raise CallbackError(f"callback {type(callback).__name__}.{event} failed at iteration "
                                    f"{state.iteration}: {type(e).__name__}: {detail}") from e
