"""Training and evaluation on COCO-format datasets."""
from .evaluate import evaluate, format_table
from .train import fit

__all__ = ["evaluate", "fit", "format_table"]
