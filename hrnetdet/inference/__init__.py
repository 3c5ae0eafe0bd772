"""Inference: prediction on files and arrays, calibration of random weights for benchmarks, the
opt-in fast path, detection matching, and export helpers."""
from .calibrate import calibrate, set_score_thresh
from .fast import fold_batchnorm, optimize_for_inference
from .match import match_detections
from .predict import coco_results, expand_inputs, load_image, predict

__all__ = ["calibrate", "coco_results", "expand_inputs", "fold_batchnorm", "load_image",
           "match_detections", "optimize_for_inference", "predict", "set_score_thresh"]
