"""A family's optimisation recipe, a leaf record: the registry's ``Family`` carries one and the
training engine reads it, so neither imports the other."""
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Recipe:
    """The reference's SGD recipe of a family; ``base_lr`` is for a total batch of 16 images."""
    base_lr: float
    warmup: str                 # "linear" (from ratio x lr) or "constant" (ratio x lr)
    warmup_ratio: float
    grad_clip: Optional[float]  # max L2 norm
    bias_lr_mult: float = 1.0   # for biases outside norm layers
    bias_decay_mult: float = 1.0


RCNN_RECIPE = Recipe(0.02, "linear", 0.001, None)
FCOS_RECIPE = Recipe(0.01, "constant", 1.0 / 3, 35.0, bias_lr_mult=2.0, bias_decay_mult=0.0)
