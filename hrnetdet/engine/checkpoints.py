"""The run folder's files kept consistent: last/ and training_state.pt written as a pair at one
iteration (a full disk or a kill leaves the previous pair whole, or one that resume mends), write
failures that name their file, and the temporaries of killed processes removed."""
import json
import logging
import os
import re
import shutil
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Sequence

from ..zoo.checkpoint import save_pretrained
from .plan import Run
from .state import TrainState

logger = logging.getLogger("hrnetdet")


@contextmanager
def naming_write_failures(path: str, note: str = "") -> Iterator[None]:
    """An OSError while writing ``path`` (a full disk, a read-only folder) names it: torch and
    safetensors raise theirs without the file's name."""
    try:
        yield
    except OSError as e:
        raise OSError(e.errno, f"{e.strerror or e}: cannot write {path}{note}") from e



def provenance(run: Run, state: TrainState) -> Dict[str, Any]:
    """What last/ and best/ record beside the weights, the iteration first: resume checks it."""
    extra: Dict[str, Any] = {"trained_on": os.path.basename(run.train_ann), "iteration": state.iteration}
    if state.ema is not None:
        extra["ema_decay"] = run.config.ema
    return extra


def save_last_and_state(run: Run, state: TrainState, rng: List[Dict[str, Any]], extra: Dict[str, Any]) -> None:
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


def mend_last(run: Run, state: TrainState) -> None:
    """Rewrite last/ from the resumed state when it records another iteration (the process was
    killed between the state's write and last/'s): the state is what the run continues from."""
    last = os.path.join(run.out_dir, "last")
    found = _last_iteration(last)
    if found != state.iteration:
        logger.warning("%s was at iteration %s, %s at %d: rewrote last/ from the training state", last, found,
                       run.state_path, state.iteration)
        with naming_write_failures(last):
            save_pretrained(state.weights, last, provenance(run, state))



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

