"""Reference (mmdetection) checkpoints for tests, built from the key listing in tests/data, which was
checked against a model built by mmdetection 3.3.0."""
import contextlib
import os
import re
import sys
import types
from collections import OrderedDict
from typing import Dict, Iterator, List, Tuple

import numpy as np
import torch

APPENDIX = os.path.join(os.path.dirname(__file__), "data", "mmdet_hrnet_keys_appendix.txt")
APPENDIX_FAMILY = {"mask_rcnn": "mask", "cascade_rcnn": "cascade", "cascade_mask_rcnn": "cmask",
                   "htc": "htc", "fcos": "fcos"}


def _sections() -> Dict[str, List[Tuple[str, List[int]]]]:
    sections: Dict[str, List[Tuple[str, List[int]]]] = {}
    current = None
    for line in open(APPENDIX):
        line = line.rstrip("\n")
        if line.startswith("## ") or (line.startswith("# W") and current is not None and "Neck" in current):
            current = line.lstrip("# ").strip() if line.startswith("## ") else f"Neck {line[2:].strip()}"
            sections[current] = []
            continue
        m = re.match(r"^(\S+) \[([\d, ]*)\]$", line)
        if m and current is not None:
            shape = [int(s) for s in m.group(2).split(",") if s.strip()]
            sections[current].append((m.group(1), shape))
    return sections


def reference_keys(family: str, width: int = 32) -> List[Tuple[str, List[int]]]:
    """Keys and shapes of a reference checkpoint of ``family`` (the listing is W32's; the heads are
    the same at every width, the HRNet's names are ours without ``body.``, the neck is listed per width)."""
    sections = _sections()
    full = next(v for k, v in sections.items() if k.startswith("1. Full key list"))
    if width != 32:
        body = _hrnet_keys(width) + sections[f"Neck W{width}"]
        full = body + [(k, s) for k, s in full if not k.startswith(("backbone.", "neck."))]
    if family == "faster_rcnn":
        return full
    body = [(k, s) for k, s in full if k.startswith(("backbone.", "neck."))]
    head = next(v for k, v in sections.items() if k.startswith("Head keys") and
                f"family={APPENDIX_FAMILY[family]} " in k + " ")
    return body + head


def _hrnet_keys(width: int) -> List[Tuple[str, List[int]]]:
    from hrnetdet.backbone import HRNet
    with torch.device("meta"):
        return [(f"backbone.{k}", list(v.shape)) for k, v in HRNet(width).state_dict().items()]


def reference_checkpoint(family: str, seed: int = 0, width: int = 32) -> Dict[str, object]:
    """A checkpoint dict as the reference publishes it, with random values."""
    g = torch.Generator().manual_seed(seed)
    sd = OrderedDict()
    for key, shape in reference_keys(family, width):
        if key.endswith("num_batches_tracked"):
            sd[key] = torch.tensor(0)
        elif key.endswith("running_var"):
            sd[key] = torch.rand(shape, generator=g) + 0.5
        else:
            sd[key] = torch.randn(shape, generator=g) * 0.01
    return {"meta": {"mmdet_version": "2.0.0"}, "state_dict": sd}


MMENGINE_MODULES = ("mmengine", "mmengine.logging", "mmengine.logging.history_buffer", "mmengine.config",
                    "mmengine.config.config")


@contextlib.contextmanager
def mmengine_classes() -> Iterator[Tuple[type, type]]:
    """(HistoryBuffer, ConfigDict) at mmengine's module paths while the block runs (mmengine itself is
    not needed): pickle finds them while a test saves, and they are gone again when hrnetdet loads."""
    modules = {name: types.ModuleType(name) for name in MMENGINE_MODULES}

    class HistoryBuffer:
        def __init__(self):
            self._log_history, self._count_history, self.max_length = np.array([0.5, 0.25]), np.array([1, 1]), 1000

    class ConfigDict(dict):
        pass

    for cls, module in ((HistoryBuffer, "mmengine.logging.history_buffer"), (ConfigDict, "mmengine.config.config")):
        cls.__module__, cls.__qualname__ = module, cls.__name__
        setattr(modules[module], cls.__name__, cls)
    saved = {name: sys.modules.get(name) for name in MMENGINE_MODULES}
    sys.modules.update(modules)
    try:
        yield HistoryBuffer, ConfigDict
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
