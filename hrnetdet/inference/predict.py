"""Prediction on image files, folders, globs, URLs, videos, PIL images, numpy arrays and tensors:
decoding in DataLoader workers, batches on the model's device, results streamed as they are ready
with category names, masks as uint8 (or RLE) at the original size."""
import contextlib
import glob
import os
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..data.images import ImageRefused, check_size, to_float
from ..data.results import mask_rle
from .modes import detect
from .options import PredictOptions, options_of
from .sources import ImageInputs, as_list, expand_inputs, is_url, is_video, video_frames
from .thresholds import score_threshold

Result = Dict[str, Any]


def default_num_workers() -> int:
    """Decode workers: half the usable cores (the rest run the model), at most 4."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(4, cores // 2)


def half_dtype(device: torch.device) -> torch.dtype:
    """The half precision a device runs well: float16 on CUDA, bfloat16 elsewhere."""
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def run_model(model: nn.Module, images: List[Tensor], options: PredictOptions) -> List[Dict[str, Tensor]]:
    """The model on one batch of [0, 1] float images on its device, plain, sliced or with
    test-time augmentation (``modes.detect``): the one place ``predict`` calls it."""
    return detect(model, images, options)


def _is_single(inputs: Any) -> bool:
    if isinstance(inputs, (str, os.PathLike)):
        path = os.fspath(inputs)
        if is_url(path):
            return not is_video(path)
        return not (os.path.isdir(path) or is_video(path) or glob.has_magic(path))
    return not isinstance(inputs, (list, tuple))


def _flatten(inputs: Any) -> List[Any]:
    """Paths, folders, globs and URLs expanded in order; in-memory images kept as they are."""
    items = [inputs] if not isinstance(inputs, (list, tuple)) else list(inputs)
    flat: List[Any] = []
    for item in items:
        flat += expand_inputs([item]) if isinstance(item, (str, os.PathLike)) else [item]
    return flat


def keep_detections(out: Dict[str, Any], label_ids: Optional[Sequence[int]], max_det: Optional[int]
                    ) -> Dict[str, Any]:
    """``out`` restricted to the labels ``label_ids`` (None: all), then to its ``max_det`` best
    scores (None: all), in the model's order; masks (a tensor or a list) follow."""
    if label_ids is None and max_det is None:
        return out
    keep = torch.arange(len(out["scores"]), device=out["scores"].device)
    if label_ids is not None:
        keep = keep[torch.isin(out["labels"], torch.tensor(label_ids, device=keep.device))]
    if max_det is not None:
        keep = keep[out["scores"][keep].argsort(descending=True, stable=True)[:max_det]].sort().values
    kept = {k: out[k][keep] for k in ("boxes", "labels", "scores")}
    if isinstance(out.get("masks"), list):
        kept["masks"] = [out["masks"][i] for i in keep.tolist()]
    elif "masks" in out:
        kept["masks"] = out["masks"][keep]
    return kept


def _finish(out: Dict[str, Tensor], categories: Sequence[str], mask_format: str) -> Result:
    """A model output on the CPU: float32 boxes and scores, uint8 (N, 1, H, W) or RLE masks, names."""
    res: Result = {"boxes": out["boxes"].float().cpu(), "labels": out["labels"].cpu(),
                   "scores": out["scores"].float().cpu()}
    if isinstance(out.get("masks"), list):  # sliced inference encodes its masks as it pastes them
        res["masks"] = out["masks"]
    elif "masks" in out:
        masks = (out["masks"] >= 0.5).to(torch.uint8).cpu()
        res["masks"] = masks if mask_format == "uint8" else [mask_rle(m) for m in masks]
    res["names"] = [categories[i] if i < len(categories) else str(i) for i in res["labels"].tolist()]
    return res


def too_small(image: Tensor, min_side: int, name: str) -> str:
    """Why the model cannot take ``image`` (a side under ``min_side`` pixels), naming it; "" if it can.
    Checked per input before batching, so one tiny image is that input's error, not its batch's
    (files were checked from their headers already; this catches arrays and video frames)."""
    try:
        check_size(name, (int(image.shape[-1]), int(image.shape[-2])), None, min_side)
    except ImageRefused as e:
        return str(e)
    return ""


def allow_pixels(pixel_limit: Optional[int]) -> None:
    """PIL refuses an image over twice its own ``MAX_IMAGE_PIXELS`` before our limit is asked: a
    limit above PIL's, or none (``--max-pixels 0``), raises PIL's for the process (decode workers
    inherit it), a choice the user made knowingly."""
    from PIL import Image

    if Image.MAX_IMAGE_PIXELS is not None and (pixel_limit is None or pixel_limit > Image.MAX_IMAGE_PIXELS):
        Image.MAX_IMAGE_PIXELS = pixel_limit


class _Inference:
    """One model run with one record of options: batches of decoded images in, results out."""

    def __init__(self, model: nn.Module, options: PredictOptions, with_images: bool):
        self.model, self.options, self.with_images = model, options, with_images
        self.device = torch.device(options.device) if options.device else next(model.parameters()).device
        self.categories = list(getattr(model, "categories", []))
        self.label_ids = options.label_ids(self.categories)  # an unknown class: refused before any input
        self.min_side = getattr(getattr(model, "transform", None), "min_image_side", 1)

    def __call__(self, images: List[Tensor], infos: List[Result]) -> Iterator[Result]:
        autocast = (torch.autocast(self.device.type, dtype=half_dtype(self.device)) if self.options.half
                    else contextlib.nullcontext())
        with autocast:
            outputs = run_model(self.model, [to_float(im.to(self.device, non_blocking=True)) for im in images],
                                self.options)
        for image, info, out in zip(images, infos, outputs):
            if self.with_images:
                info["image"] = image
            out = keep_detections(out, self.label_ids, self.options.max_det)
            yield {**_finish(out, self.categories, self.options.mask_format), **info}


def _segments(items: Sequence[Any]) -> Iterator[Tuple[int, int]]:
    """(start, stop) of each video alone and of each run of consecutive other items."""
    start = 0
    while start < len(items):
        stop = start + 1
        while not is_video(items[start]) and stop < len(items) and not is_video(items[stop]):
            stop += 1
        yield start, stop
        start = stop


def _video_results(infer: _Inference, path: str, index: int) -> Iterator[Result]:
    """A video's frames' results, ``batch_size`` frames at a time; an error record where it stops."""
    base = {"input_index": index, "file_name": path}
    images, infos = [], []
    try:
        for frame_index, timestamp, frame in video_frames(path):
            small = too_small(frame, infer.min_side, path)
            if small:
                raise ValueError(small)
            images.append(frame)
            infos.append({**base, "frame_index": frame_index, "timestamp": round(timestamp, 6)})
            if len(images) == infer.options.batch_size:
                yield from infer(images, infos)
                images, infos = [], []
    except ValueError as e:
        yield {**base, "error": str(e)}
    if images:
        yield from infer(images, infos)


def _loader(segment: Sequence[Any], options: PredictOptions, device: torch.device) -> Iterator[List[Any]]:
    """Batches of ``(i, image or None, error)`` of ``segment``, decoded in workers (files only)."""
    in_memory = any(not isinstance(x, (str, os.PathLike)) for x in segment)
    workers = 0 if in_memory else (default_num_workers() if options.num_workers is None else options.num_workers)
    workers = min(workers, (len(segment) - 1) // options.batch_size)  # no process for a single batch
    return torch.utils.data.DataLoader(ImageInputs(segment, max_pixels=options.pixel_limit),
                                       batch_size=options.batch_size, num_workers=workers, collate_fn=as_list,
                                       pin_memory=device.type == "cuda")


def _image_results(infer: _Inference, segment: Sequence[Any], indices: Sequence[int]) -> Iterator[Result]:
    """Results of images (files, URLs, in-memory), a batch at a time; error records in place."""
    for batch in _loader(segment, infer.options, infer.device):
        images, infos = [], []
        for i, image, error in batch:
            info: Result = {"input_index": indices[i]}
            if isinstance(segment[i], (str, os.PathLike)):
                info["file_name"] = os.fspath(segment[i])
            if image is not None:
                error = too_small(image, infer.min_side, info.get("file_name", f"input {indices[i]}"))
            if image is None or error:
                yield {**info, "error": error}
            else:
                images.append(image)
                infos.append(info)
        if images:
            yield from infer(images, infos)


def iter_predictions(model: nn.Module, items: Sequence[Any], options: Optional[PredictOptions] = None, *,
                     indices: Optional[Sequence[int]] = None, with_images: bool = False) -> Iterator[Result]:
    """Results for already expanded ``items`` (paths, URLs, videos, in-memory images), in order,
    run with ``options`` (its ``score_thresh`` is the caller's: ``score_threshold``).

    Each result carries ``input_index`` (the item's position, or ``indices[i]``), ``file_name``
    for paths and URLs, ``frame_index`` and ``timestamp`` for video frames, and with
    ``with_images`` the decoded ``image`` (CPU; integer pixels for files). An item that cannot be
    read gives ``{"error": message, ...}`` instead of detections; the caller decides whether to stop.
    """
    options = options or PredictOptions()
    infer = _Inference(model, options, with_images)
    indices = list(range(len(items))) if indices is None else list(indices)
    allow_pixels(options.pixel_limit)
    for start, stop in _segments(items):
        if is_video(items[start]):
            yield from _video_results(infer, os.fspath(items[start]), indices[start])
        else:
            yield from _image_results(infer, items[start:stop], indices[start:stop])


def predict(model: nn.Module, inputs: Any, options: Optional[PredictOptions] = None, *, progress: bool = False,
            stream: bool = False, backend: str = "torch", **fields: Any
            ) -> Union[Result, List[Result], Iterator[Result]]:
    """Run a detector on one image or many.

    ``inputs``: an image (path, http(s) URL, PIL image, HWC uint8 RGB array, CHW tensor), a
    folder, glob pattern or video file, or a list of these. Returns one result for one image,
    else a list, or with ``stream=True`` a generator that yields each result as its batch is done
    and keeps nothing. Each result: {boxes (N, 4) xyxy, labels, scores[, masks], names (category
    names), input_index[, file_name][, frame_index, timestamp]}; masks are (N, 1, H, W) uint8 at
    the image's size, or COCO RLE dicts with ``mask_format="rle"``.

    The options are a ``PredictOptions`` record, or its fields as keywords (both: the keywords
    change the record), all checked before any input is read:
    ``score_thresh`` replaces the model's box score threshold for this call (detections must
    score above it). Files are decoded in ``num_workers`` DataLoader workers (default: half the
    cores, at most 4), refused over ``max_pixels`` pixels (0: no limit), and run ``batch_size`` at
    a time on ``device``. ``half=True`` runs the model under autocast (float16 on CUDA, bfloat16 on
    the CPU); results are float32 either way. ``classes`` (names or label ids) keeps those classes'
    detections, ``max_det`` the best that many per image. ``slice``: sliced inference in SxS tiles
    overlapping by ``overlap`` (plus the whole image when ``full_image``); ``tta``: test-time
    augmentation (see ``hrnetdet.inference.modes``). An unreadable file raises ValueError naming
    it. The model is put in eval mode.
    ``backend``: see ``optimize_for_inference`` (a runtime backend works on a copy of the model, on
    sessions kept with ``model`` for the next call; ``runtime.close_runtime(model)`` releases them).
    """
    options = options_of(options, **fields)
    device = torch.device(options.device) if options.device is not None else next(model.parameters()).device
    options.label_ids(list(getattr(model, "categories", [])))
    single = _is_single(inputs)
    items = _flatten(inputs)
    model.eval()
    if backend != "torch":
        from .runtime import runtime_copy
        model = runtime_copy(model, backend)
    model.to(device)
    results = _stream(model, items, options, progress=progress)
    if stream:
        return results
    out = list(results)
    return out[0] if single and len(out) == 1 else out


def _stream(model: nn.Module, items: List[Any], options: PredictOptions, *, progress: bool) -> Iterator[Result]:
    """``iter_predictions`` with the score threshold override, no_grad, a progress bar, and
    unreadable inputs raised."""
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=None if any(is_video(x) for x in items) else len(items), unit="img")
    try:
        with score_threshold(model, options.score_thresh), torch.no_grad():
            for res in iter_predictions(model, items, options):
                if "error" in res:
                    raise ValueError(res["error"])
                if bar is not None:
                    bar.update(1)
                yield res
    finally:
        if bar is not None:
            bar.close()
