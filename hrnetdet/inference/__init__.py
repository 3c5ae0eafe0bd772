"""Inference: prediction on files and arrays, calibration of random weights for benchmarks, the
opt-in fast path, detection matching, and export helpers."""
from .calibrate import calibrate, set_score_thresh
from .fast import fold_batchnorm, optimize_for_inference
from .match import match_detections
from ..data.images import load_image
from .predict import predict
from .sources import expand_inputs

__all__ = ["calibrate", "expand_inputs", "fold_batchnorm", "load_image",
           "match_detections", "optimize_for_inference", "predict", "set_score_thresh"]
