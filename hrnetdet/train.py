"""``hrnetdet.train.fit`` (and ``evaluate``), the training API's public home."""
from .engine.evaluate import evaluate
from .engine.train import fit

__all__ = ["evaluate", "fit"]
