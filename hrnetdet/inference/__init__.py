"""Inference: prediction on files and arrays, the opt-in fast path, detection matching, a
score-threshold override, and export helpers."""
from ..data.images import load_image
from .fast import optimize_for_inference
from .folding import fold_batchnorm
from .match import match_detections
from .options import OptionError, PredictOptions
from .predict import predict
from .sources import expand_inputs
from .thresholds import score_threshold

__all__ = ["expand_inputs", "fold_batchnorm", "load_image", "match_detections", "optimize_for_inference",
           "OptionError", "PredictOptions", "predict", "score_threshold"]
