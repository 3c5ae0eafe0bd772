"""Export: ``export(model, out_dir, format)`` writes TorchScript, ONNX or OpenVINO files of any
family and checks them against the eager model at export time (see docs/EXPORT.md).

ONNX and OpenVINO exports hold one graph per dense part (``runtime.py``): the runtime backends
load them and keep torchvision's contract. ``export_onnx`` writes instead one graph of a whole
Faster R-CNN, Mask R-CNN or FCOS for a fixed image size, which runs without PyTorch.
"""
import copy
import os
import shutil
import tempfile
import warnings
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..detectors import has_masks
from ..zoo.checkpoint import save_pretrained
from .thresholds import score_threshold
from .match import match_detections
from .quantize import DEFAULT_CALIBRATION_SIZE, calibration_images, quantize_parts, require_quantizer
from .runtime import EXAMPLE_SIZE, MANIFEST, attach, export_parts, generated_image, require

FORMATS = ("torchscript", "onnx", "openvino")
# The export-time check: a second size of the example's aspect ratio (the same padded input, for
# static graphs) or of another aspect ratio (dynamic graphs and TorchScript).
STATIC_CHECK_SIZES = (EXAMPLE_SIZE, (600, 800))
DYNAMIC_CHECK_SIZES = (EXAMPLE_SIZE, (544, 416))


def _load_torchscript(path: str) -> Callable[[List[Tensor]], List[Dict[str, Tensor]]]:
    scripted = torch.jit.load(path)

    def run(images: List[Tensor]) -> List[Dict[str, Tensor]]:
        out = scripted(images)
        return out[1] if isinstance(out, tuple) else out  # GeneralizedRCNN scripts to (losses, detections)
    return run


def _openvino_ir(onnx_dir: str, out_dir: str, half: bool) -> None:
    """Convert each part's ONNX graph to OpenVINO IR (``half``: weights stored in float16)."""
    import json

    ov = require("openvino")
    with open(os.path.join(onnx_dir, MANIFEST)) as f:
        manifest = json.load(f)
    for entry in manifest["parts"].values():
        xml = entry["file"].replace(".onnx", ".xml")
        ov.save_model(ov.convert_model(os.path.join(onnx_dir, entry["file"])), os.path.join(out_dir, xml),
                      compress_to_fp16=half)
        entry["file"] = xml
    with open(os.path.join(out_dir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)


def export(model: nn.Module, out_dir: str, format: str = "onnx", *, dynamic: bool = False,
           half: bool = False, opset: int = 17, check: bool = True, precision: str = "fp32",
           calibration: Any = None, calibration_size: int = DEFAULT_CALIBRATION_SIZE,
           log: Callable[[str], Any] = print) -> List[Dict[str, float]]:
    """Export ``model`` to ``out_dir`` as ``format`` and, with ``check``, compare the exported
    model's detections with eager's on a generated image at two sizes, logging the matched share.

    ``torchscript``: ``model.pt``, the whole model (any size). ``onnx``: one graph per dense part
    plus ``export.json``, run through ``hrnetdet.optimize_for_inference(model, backend=...)`` or
    ``runtime.attach``; RoI parts take any number of RoIs, image parts any batch and image size
    with ``dynamic``, else only the padded size of a 480x640 image (any image of that aspect ratio).
    ``openvino``: the same graphs as OpenVINO IR; ``half`` stores their weights in float16 (the
    CPU still computes in float32). Every format also gets the model's ``model.safetensors`` and
    ``config.json`` (``save_pretrained``), so the folder names the model wherever a model is named
    (``create_model(out_dir)``, ``--model OUT``). ``precision="int8"``: ONNX graphs quantized for
    onnxruntime (QDQ) or OpenVINO IR quantized by NNCF, calibrated on ``calibration`` (as
    ``optimize_for_inference`` takes it; ``quantize.py``). Returns the match statistics per checked size."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    images = _int8_calibration(format, half, precision, calibration, calibration_size)
    if half and format != "openvino":
        raise ValueError("half: only --format openvino stores float16 weights; onnxruntime's CPU provider "
                         "has no float16 convolutions and eager float16 is slower than float32 on the CPU")
    model.eval()
    created = not os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export.", dir=out_dir)
    try:
        with warnings.catch_warnings():  # the tracer's notes on Python values it records as constants
            warnings.simplefilter("ignore")
            if format == "torchscript":
                torch.jit.script(model).save(os.path.join(tmp, "model.pt"))
            elif images:
                with tempfile.TemporaryDirectory() as onnx_dir:
                    export_parts(model, generated_image(*EXAMPLE_SIZE), onnx_dir, dynamic=dynamic, opset=opset,
                                 winograd=False)
                    quantize_parts(model, onnx_dir, tmp, INT8_BACKENDS[format], images)
            elif format == "onnx":
                export_parts(model, generated_image(*EXAMPLE_SIZE), tmp, dynamic=dynamic, opset=opset)
            else:
                with tempfile.TemporaryDirectory() as onnx_dir:
                    export_parts(model, generated_image(*EXAMPLE_SIZE), onnx_dir, dynamic=dynamic, opset=opset)
                    _openvino_ir(onnx_dir, tmp, half)
        stats = _check(model, tmp, format, dynamic, log) if check else []
        save_pretrained(model, tmp)  # the folder also names the model: create_model(out_dir), --model OUT
        for name in sorted(os.listdir(tmp), key=lambda n: n == MANIFEST):  # the manifest last
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if created and not os.listdir(out_dir):
            os.rmdir(out_dir)  # a failed export leaves no folder it made
    return stats


INT8_BACKENDS = {"onnx": "onnxruntime", "openvino": "openvino"}


def _int8_calibration(format: str, half: bool, precision: str, calibration: Any, size: int) -> List[Tensor]:
    """The calibration images of an int8 export (none for float32), loaded before anything is
    exported; refuses combinations that have no int8 form."""
    if precision == "fp32":
        return []
    if precision != "int8":
        raise ValueError(f"precision must be 'fp32' or 'int8', got {precision!r}")
    if format not in INT8_BACKENDS or half:
        raise ValueError("int8: --format onnx (onnxruntime QDQ) or openvino (NNCF) only, without --half")
    if calibration is None:
        raise ValueError("int8 needs calibration images (--calibration): a folder, a COCO json or a list")
    require_quantizer(INT8_BACKENDS[format])
    return calibration_images(calibration, size)


def _check(model: nn.Module, export_dir: str, format: str, dynamic: bool,
           log: Callable[[str], Any]) -> List[Dict[str, float]]:
    """The export-time check of the files in ``export_dir`` (still the temporary folder: a file whose
    check fails never reaches ``out_dir``)."""
    if format == "torchscript":
        run = _load_torchscript(os.path.join(export_dir, "model.pt"))
    else:
        run = attach(copy.deepcopy(model), export_dir, "onnxruntime" if format == "onnx" else "openvino")
    sizes = DYNAMIC_CHECK_SIZES if dynamic or format == "torchscript" else STATIC_CHECK_SIZES
    return [check_export(model, run, size, log) for size in sizes]


def check_export(model: nn.Module, exported: Callable[[List[Tensor]], List[Dict[str, Tensor]]],
                 size: Tuple[int, int], log: Callable[[str], Any] = print) -> Dict[str, float]:
    """Match ``exported``'s detections against ``model``'s on a generated image of ``size``."""
    image = generated_image(*size, seed=1)
    with torch.no_grad():
        stats = match_detections(model([image])[0], exported([image])[0])
    log(f"{size[0]}x{size[1]}: {stats['n_matched']} of eager's {stats['n_ref']} detections matched "
        f"({100 * stats['matched_frac']:.1f}%)")
    return stats


class _FlatOutputs(nn.Module):
    """A detector taking one (B, 3, H, W) batch and returning a flat tuple of per-image tensors
    (boxes, labels, scores[, masks] for image 0, then image 1, ...), which ONNX can express."""

    def __init__(self, model: nn.Module, keys: Sequence[str]):
        super().__init__()
        self.model = model
        self.keys = list(keys)

    def forward(self, images: Tensor) -> Tuple[Tensor, ...]:
        return tuple(r[k] for r in self.model(list(images.unbind(0))) for k in self.keys)


def output_keys(model: nn.Module) -> List[str]:
    return ["boxes", "labels", "scores"] + (["masks"] if has_masks(model) else [])


def export_onnx(model: nn.Module, path: str, batch_size: int = 1, image_size: Tuple[int, int] = (800, 1216),
                opset_version: int = 17) -> List[str]:
    """Export a whole Faster R-CNN, Mask R-CNN or FCOS to one ONNX graph for ``batch_size`` images
    of ``image_size`` (H, W) each, with the TorchScript-based exporter. Input ``images``
    (B, 3, H, W) floats in [0, 1]; outputs named ``boxes_0, labels_0, scores_0[, masks_0],
    boxes_1, ...``. Returns the output names.

    Mask models: ``masks_i`` are (N, 1, 28, 28) probabilities in each box's frame (the transform's
    ``paste`` is off while tracing), to be pasted with
    ``hrnetdet.heads.masks.paste_masks(masks, boxes, H, W)``; they are exported with score
    threshold 0 (per-image splits are traced as constants, so every image must carry
    ``detections_per_img`` detections; filter by score afterwards)."""
    model.eval()
    keys = output_keys(model)
    names = [f"{k}_{i}" for i in range(batch_size) for k in keys]
    x = torch.rand(batch_size, 3, *image_size)
    model.transform.paste = False
    # Tracing freezes the detection count in the per-image mask split: with threshold 0
    # every image carries detections_per_img detections.
    try:
        with score_threshold(model, 0.0 if "masks" in keys else None):
            torch.onnx.export(_FlatOutputs(model, keys), (x,), path, dynamo=False, opset_version=opset_version,
                              input_names=["images"], output_names=names,
                              dynamic_axes={n: {0: f"num_{n}"} for n in names})
    finally:
        model.transform.paste = True
    return names

