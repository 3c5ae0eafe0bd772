"""How a model is named, the same way in Python (``create_model``) and in every command's
``--model``: an architecture with an optional weight tag (``arch.tag``), a folder that
save_pretrained wrote (a training run's ``best/`` or ``last/``, or the run folder itself), or an
``hf-hub:org/name[@revision]``. Imports nothing heavy: the CLI checks names before torch loads."""
import os
from typing import Optional, Tuple

CONFIG_FILE = "config.json"  # what save_pretrained writes beside the weights
HF_HUB_PREFIX = "hf-hub:"
RUN_FOLDERS = ("best", "last")  # what a training run's folder holds, in the order one is chosen


def split_name(name: str) -> Tuple[str, Optional[str]]:
    """``arch.tag`` -> (arch, tag); a bare arch has no tag."""
    arch, _, tag = name.partition(".")
    return arch, (tag or None)


def names_weights(name: str) -> bool:
    """Whether a model name brings its weights: a folder, an ``hf-hub:`` name or an ``arch.tag``;
    a bare architecture does not."""
    return os.path.isdir(name) or name.startswith(HF_HUB_PREFIX) or split_name(name)[1] is not None


def saved_model_folder(folder: str) -> str:
    """The folder save_pretrained wrote that ``folder`` names: itself, or a training run's best/
    (else last/)."""
    for chosen in (folder, *(os.path.join(folder, sub) for sub in RUN_FOLDERS)):
        if os.path.isfile(os.path.join(chosen, CONFIG_FILE)):
            return chosen
    raise FileNotFoundError(f"{folder} is a folder without {CONFIG_FILE} (nor a training run's best/ or last/ "
                            f"with one): not one save_pretrained wrote")
