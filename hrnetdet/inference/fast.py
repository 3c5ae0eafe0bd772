"""Opt-in inference fast path: the same function computed with less work.

``optimize_for_inference(model)`` folds every batch norm of the HRNet body into the convolution
before it, moves the convolutions to the channels-last memory layout (HRNet's narrow
high-resolution convolutions run several times faster on the CPU in that layout), and swaps HRFPN
for an equivalent that reduces channels before upsampling. ``compile=True`` also hands the
backbone to ``torch.compile`` with frozen weights (inductor fuses the many small convolutions,
additions and ReLUs of HRNet's exchange units), at the price of a compilation on the first call of
each input size. Outputs stay within the parity tolerance of the plain model
(``tests/test_fast.py``); the model is for inference only afterwards.
"""
from typing import Any

import torch
from torch import nn

from ..neck.hrfpn import use_fast_neck
from .folding import fold_batchnorm


def optimize_for_inference(model: nn.Module, *, backend: str = "torch", precision: str = "fp32",
                           calibration: Any = None, calibration_size: int = 128, fold_bn: bool = True,
                           channels_last: bool = True, fast_neck: bool = True, compile: bool = False,
                           cache_dir: str = "") -> nn.Module:
    """Apply the fast path to an hrnetdet detector in place and return it (in eval mode).

    ``backend="onnxruntime"`` or ``"openvino"`` (``"auto"``: the faster one installed) instead runs
    the dense parts in that runtime (``runtime.py``), exported once per weights into ``cache_dir``
    (default ``$HRNETDET_HOME/exports``); its graphs compute HRFPN in ``FastHRFPN``'s order and
    the other options do not apply. The returned model's ``runtime`` owns the sessions:
    ``model.runtime.close()`` (or ``with model.runtime:``) releases them, after which the model
    refuses to run.
    ``precision="int8"`` (with a runtime backend) runs int8 graphs instead, quantized after training
    (OpenVINO: NNCF; onnxruntime: static QDQ) and calibrated on ``calibration``: an image folder, a
    COCO json (its ``file_name``s relative to the json's folder), a ``(json, image_folder)`` pair or
    a list of images; at most ``calibration_size`` of them. The quantized graphs are cached by
    weights and calibration set (``quantize.py``; what stays float32: docs/EXPORT.md).
    ``compile`` needs a C++ compiler on the CPU (inductor) and takes about 40 s for W18 at
    800x1216 on one core, once per input size; it pays for long runs over same-sized inputs."""
    if precision not in ("fp32", "int8"):
        raise ValueError(f"precision must be 'fp32' or 'int8', got {precision!r}")
    if precision == "int8":
        if backend == "torch":
            raise ValueError("precision='int8' runs in a runtime: backend='openvino', 'onnxruntime' or 'auto'")
        if calibration is None:
            raise ValueError("precision='int8' needs calibration= images: a folder, a COCO json or a list")
        from .quantize import int8_model
        return int8_model(model, backend, calibration, cache_dir=cache_dir, calibration_size=calibration_size)
    if backend != "torch":
        from .runtime import runtime_model
        return runtime_model(model, backend, cache_dir)
    model.eval()
    backbone = model.backbone
    if fold_bn:
        fold_batchnorm(backbone.body)
    if fast_neck:
        use_fast_neck(model)
    if channels_last:
        backbone.to(memory_format=torch.channels_last)
    if compile:
        for p in backbone.parameters():
            p.requires_grad_(False)  # frozen weights: inductor constant-folds and prepacks them
        model.backbone = torch.compile(backbone, options={"freezing": True})
    return model
