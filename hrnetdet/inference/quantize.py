"""int8 runtime backends: the dense parts' graphs quantized after training, calibrated on the
user's own images.

Each part is calibrated on the inputs it actually sees: the calibration images go through the
model's own transform and, for the heads, through the float32 eager model up to that part (a
forward pre-hook records the part's inputs and stops the pass there). OpenVINO graphs are
quantized by NNCF, onnxruntime graphs by onnxruntime's static QDQ quantization (per-channel
weights). The source graphs are the float32 export without the Winograd convolutions (an int8
convolution beats them and their transformed weights round worse). Which parts stay in float32 is
``FP32_PARTS``, chosen by measurement (docs/EXPORT.md, 'int8'). The quantized graphs are cached by
weights, calibration set and settings, beside the float32 exports.
"""
import contextlib
import hashlib
import json
import logging
import os
import shutil
from typing import Any, Callable, Dict, Iterator, List, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from .runtime import (MANIFEST, _tensor_leaves, attach, cache_key, cached_export, cached_folder, default_cache_dir,
                      folded_copy, require, resolve_backend)
from .thresholds import score_threshold

DEFAULT_CALIBRATION_SIZE = 128
# Parts left in float32, by the last component of their name: the final classification and box
# regression layers (a few percent of the arithmetic, and their outputs are the scores and boxes).
FP32_PARTS = ("box_predictor", "mask_predictor")
# Part of the cache key: raised whenever the quantization writes other graphs for the same inputs
# (2: onnxruntime quantizes the convolutions whose bias the exporter had shared; 3: NNCF with
# global min/max activation ranges and without its bias correction).
REVISION = 3
Calibration = Union[str, os.PathLike, Sequence[Any]]


class CalibrationError(ValueError):
    """Calibration input that cannot be used; the message names it."""


def _folder_images(folder: str) -> List[str]:
    from .sources import expand_inputs, is_video

    try:
        paths = [p for p in expand_inputs([folder]) if not is_video(p)]
    except FileNotFoundError as e:
        raise CalibrationError(f"calibration: {e}") from None
    if not paths:
        raise CalibrationError(f"calibration: folder {folder!r} holds no images")
    return paths


def _coco_images(ann_file: str, folder: str) -> List[str]:
    from ..data.coco import read_annotations

    try:
        records = read_annotations(ann_file)["images"]
    except (OSError, ValueError) as e:
        raise CalibrationError(f"calibration: {e}") from None
    if not records:
        raise CalibrationError(f"calibration: {ann_file} lists no images")
    return [os.path.join(folder, r["file_name"]) for r in records]


def calibration_paths(calibration: Calibration) -> List[str]:
    """The image files of a calibration folder, or of a COCO json (``(json, image_folder)``, or a
    json path alone: its ``file_name``s relative to the json's folder)."""
    if isinstance(calibration, (str, os.PathLike)):
        path = os.fspath(calibration)
        if os.path.isdir(path):
            return _folder_images(path)
        if path.lower().endswith(".json"):
            return _coco_images(path, os.path.dirname(path))
        raise CalibrationError(f"calibration: {path!r} is neither an image folder nor a COCO json")
    ann_file, folder = map(os.fspath, calibration)
    if not os.path.isdir(folder):
        raise CalibrationError(f"calibration: image folder {folder!r} not found")
    return _coco_images(ann_file, folder)


def calibration_images(calibration: Calibration, limit: int = DEFAULT_CALIBRATION_SIZE) -> List[Tensor]:
    """At most ``limit`` CHW float images: ``calibration`` is a list of images (tensors, arrays,
    paths), an image folder, a COCO json or a ``(json, image_folder)`` pair (the first ``limit``
    images, in listing order)."""
    from ..data.images import load_image

    if limit < 1:
        raise CalibrationError(f"calibration_size must be at least 1, got {limit}")
    is_pair = (isinstance(calibration, (tuple, list)) and len(calibration) == 2
               and all(isinstance(c, (str, os.PathLike)) for c in calibration)
               and os.fspath(calibration[0]).lower().endswith(".json"))
    if isinstance(calibration, (str, os.PathLike)) or is_pair:
        items: Sequence[Any] = calibration_paths(calibration)
    else:
        items = list(calibration)
    if not items:
        raise CalibrationError("calibration: no images given")
    images = []
    for i, item in enumerate(items[:limit]):
        name = os.fspath(item) if isinstance(item, (str, os.PathLike)) else f"calibration image {i}"
        try:
            images.append(load_image(item, name))
        except (OSError, ValueError) as e:
            raise CalibrationError(f"calibration: {e}") from None
    return images


def calibration_hash(images: Sequence[Tensor]) -> str:
    h = hashlib.sha256()
    for image in images:
        h.update(repr(tuple(image.shape)).encode())
        h.update(image.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class _Reached(Exception):
    """Raised by the capture hook: the rest of the model is not needed for this part."""


class PartInputs:
    """The inputs part ``name`` of ``model`` sees on each calibration image (one sample per image:
    its first call), as flat float32 arrays in the graph's input order; recomputed on each pass,
    so that no more than one image's features are held at a time. Iterable more than once."""

    def __init__(self, model: nn.Module, name: str, images: Sequence[Tensor]):
        self.model, self.name, self.images = model, name, images
        self.part = dict(model.named_modules())[name]

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator[List[np.ndarray]]:
        for image in self.images:
            captured: List[List[np.ndarray]] = []

            def hook(module, args, kwargs):
                leaves = tree_leaves((args, kwargs))
                captured.append([t.detach().float().cpu().contiguous().numpy() for t in _tensor_leaves(leaves)])
                raise _Reached

            handle = self.part.register_forward_pre_hook(hook, with_kwargs=True)
            try:  # threshold 0: the mask heads see a full set of detections, as at export
                with score_threshold(self.model, 0.0), torch.no_grad():
                    self.model([image])
            except _Reached:
                pass
            finally:
                handle.remove()
            if captured:
                yield captured[0]


def capture_model(model: nn.Module) -> nn.Module:
    """A float32 eager copy of ``model`` whose parts' inputs calibrate the graphs: the function the
    graphs were exported from, computed with less work."""
    return folded_copy(model).eval()


def _quantize_openvino(src: str, dst: str, samples: PartInputs) -> None:
    ov, nncf = require("openvino"), require("nncf")
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    # Measured on trained models (docs/EXPORT.md, 'int8'): activation ranges from the mean of each
    # image's min/max (NNCF's default) clipped HRNet's activations (-0.030 AP on a Mask R-CNN), and
    # its fast bias correction cost 0.015 AP on a Faster R-CNN; global min/max ranges without bias
    # correction lost neither.
    settings = AdvancedQuantizationParameters(
        disable_bias_correction=True, activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX)
    quantized = nncf.quantize(ov.convert_model(src), nncf.Dataset(samples), preset=nncf.QuantizationPreset.MIXED,
                              subset_size=len(samples), advanced_parameters=settings)
    ov.save_model(quantized, dst, compress_to_fp16=False)


@contextlib.contextmanager
def _root_logger_at(level: int) -> Iterator[None]:
    root = logging.getLogger()
    previous = root.level
    root.setLevel(level)
    try:
        yield
    finally:
        root.setLevel(previous)


def _identities_as_initializers(path: str):
    """The ONNX graph at ``path`` with each ``Identity`` of a weight replaced by a copy of the weight.

    The exporter stores equal weights once (two zero biases become one initializer and an
    ``Identity``); onnxruntime's quantizer leaves a convolution whose bias is not an initializer in
    float32."""
    import onnx

    graph = (model := onnx.load(path)).graph
    weights = {w.name: w for w in graph.initializer}
    for node in [n for n in graph.node if n.op_type == "Identity" and n.input[0] in weights]:
        duplicate = onnx.TensorProto()
        duplicate.CopyFrom(weights[node.input[0]])
        duplicate.name = node.output[0]
        graph.initializer.append(duplicate)
        graph.node.remove(node)
    return model


def _quantize_onnxruntime(src: str, dst: str, samples: PartInputs) -> None:
    ort = require("onnxruntime")
    from onnxruntime import quantization as q

    names = [i.name for i in ort.InferenceSession(src, providers=["CPUExecutionProvider"]).get_inputs()]

    class Reader(q.CalibrationDataReader):
        def __init__(self):
            self.samples = iter(samples)

        def get_next(self):
            sample = next(self.samples, None)
            return None if sample is None else dict(zip(names, sample))

    # u8 activations, s8 per-channel weights: the x86 VNNI kernels' form.
    with _root_logger_at(logging.ERROR):  # its advice on every part (pre-processing, folded biases)
        q.quantize_static(_identities_as_initializers(src), dst, Reader(), quant_format=q.QuantFormat.QDQ, per_channel=True,
                          activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                          calibrate_method=q.CalibrationMethod.MinMax)


QUANTIZERS: Dict[str, Callable[[str, str, PartInputs], None]] = {
    "openvino": _quantize_openvino, "onnxruntime": _quantize_onnxruntime}


def _openvino_ir(src: str, dst: str) -> None:
    ov = require("openvino")
    ov.save_model(ov.convert_model(src), dst, compress_to_fp16=False)


FP32_COPIES: Dict[str, Callable[[str, str], Any]] = {"openvino": _openvino_ir, "onnxruntime": shutil.copyfile}
SUFFIX = {"openvino": (".xml", ".xml"), "onnxruntime": (".int8.onnx", ".onnx")}  # (quantized, float32)


def stays_fp32(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in FP32_PARTS


def quantize_parts(model: nn.Module, fp32_dir: str, out_dir: str, backend: str, images: Sequence[Tensor]) -> None:
    """Write into ``out_dir`` ``fp32_dir``'s graphs (a float32 export of ``model``) quantized for
    ``backend``, each calibrated on its inputs on ``images``; ``FP32_PARTS`` stay float32."""
    with open(os.path.join(fp32_dir, MANIFEST)) as f:
        manifest = json.load(f)
    capture = capture_model(model)
    for name, entry in manifest["parts"].items():
        src = os.path.join(fp32_dir, entry["file"])
        entry["file"] = entry["file"][: -len(".onnx")] + SUFFIX[backend][stays_fp32(name)]
        dst = os.path.join(out_dir, entry["file"])
        if stays_fp32(name):
            FP32_COPIES[backend](src, dst)
        else:
            QUANTIZERS[backend](src, dst, PartInputs(capture, name, images))
    with open(os.path.join(out_dir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)


def _versions(backend: str) -> Dict[str, str]:
    modules = ("openvino", "nncf") if backend == "openvino" else ("onnxruntime",)
    return {m: getattr(require(m), "__version__", "") for m in modules}


def int8_key(model: nn.Module, backend: str, images: Sequence[Tensor]) -> str:
    """The int8 folder's name: the float32 source's key (architecture, weights, export settings),
    the calibration images' hash and the quantization settings and tools."""
    h = hashlib.sha256(cache_key(model, winograd=False).encode())
    h.update(calibration_hash(images).encode())
    settings = {"backend": backend, "fp32_parts": FP32_PARTS, "capture": "first call, score threshold 0",
                "revision": REVISION, **_versions(backend)}
    h.update(json.dumps(settings, sort_keys=True).encode())
    return f"int8-{backend}-{h.hexdigest()[:24]}"


def cached_int8(model: nn.Module, backend: str, images: Sequence[Tensor], cache_dir: str) -> str:
    """The folder of ``model``'s int8 graphs for ``backend`` calibrated on ``images``, quantized
    once per weights and calibration set (written as ``cached_export`` writes: atomically, safe
    under concurrent processes)."""
    fp32_dir = cached_export(model, cache_dir, winograd=False)
    return cached_folder(cache_dir, int8_key(model, backend, images),
                         lambda out: quantize_parts(model, fp32_dir, out, backend, images))


def require_quantizer(backend: str) -> None:
    """``backend``'s runtime and quantizer (OpenVINO's: NNCF), or an ImportError naming the extra."""
    require(backend)
    if backend == "openvino":
        require("nncf")


def int8_model(model: nn.Module, backend: str, calibration: Calibration, *, cache_dir: str = "",
               calibration_size: int = DEFAULT_CALIBRATION_SIZE) -> nn.Module:
    """``model`` (changed in place) with its dense parts run as int8 graphs by ``backend``."""
    backend = resolve_backend(backend)
    require_quantizer(backend)
    images = calibration_images(calibration, calibration_size)
    model.eval()
    return attach(model, cached_int8(model, backend, images, cache_dir or default_cache_dir()), backend)
