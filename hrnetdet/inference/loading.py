"""The model that ``hrnetdet predict``, ``hrnetdet serve`` and Ray's actors build from one spec, so
that a model named the same way is the same model wherever it runs."""
from typing import Any, Dict, Optional

from torch import nn

from ..names import names_weights
from ..zoo import factory
from .fast import optimize_for_inference


def load_model(model: str, *, pretrained: Any = False, checkpoint_path: Optional[str] = None,
               backend: str = "torch", fast: bool = False, int8: Optional[Dict[str, Any]] = None,
               **settings: Any) -> nn.Module:
    """The model ``hrnetdet predict --model`` builds: ``model`` names an architecture (weights from
    ``pretrained`` or ``checkpoint_path``), a saved or run folder, or ``hf-hub:org/name``;
    ``settings`` (``min_size``, ...) go to ``create_model``; ``fast`` or a ``backend`` other than
    torch run it through ``optimize_for_inference``, with ``int8``'s keywords (``precision``,
    ``calibration``, ``calibration_size``) when given. In eval mode."""
    built = factory.create_model(model, pretrained=pretrained or names_weights(model),
                                 checkpoint_path=checkpoint_path, **settings)
    if fast or backend != "torch":
        optimize_for_inference(built, backend=backend, **(int8 or {}))
    return built.eval()
