"""Training and evaluation on COCO-format datasets."""
from .callbacks import Callback, CallbackError
from .evaluate import evaluate, format_table
from .train import fit

__all__ = ["Callback", "CallbackError", "evaluate", "fit", "format_table"]
