"""Prediction on image files, folders, globs, URLs, videos, PIL images, numpy arrays and tensors:
decoding in DataLoader workers, batches on the model's device, results streamed as they are ready
with category names, masks as uint8 (or RLE) at the original size."""
import contextlib
import glob
import os
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..data.images import ImageRefused, check_size, to_float
from ..data.results import MASK_FORMATS, mask_rle
from .modes import check_mode, detect
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


def run_model(model: nn.Module, images: List[Tensor], mode: Dict[str, Any]) -> List[Dict[str, Tensor]]:
    """The model on one batch of [0, 1] float images on its device, plain, sliced or with
    test-time augmentation (``mode``: ``modes.detect``'s settings): the one place ``predict`` calls it."""
    return detect(model, images, **mode)


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


def iter_predictions(model: nn.Module, items: Sequence[Any], *, batch_size: int = 1,
                     device: Optional[torch.device] = None, num_workers: Optional[int] = None,
                     half: bool = False, mask_format: str = "uint8",
                     indices: Optional[Sequence[int]] = None, with_images: bool = False,
                     mode: Optional[Dict[str, Any]] = None) -> Iterator[Result]:
    """Results for already expanded ``items`` (paths, URLs, videos, in-memory images), in order.

    Each result carries ``input_index`` (the item's position, or ``indices[i]``), ``file_name``
    for paths and URLs, ``frame_index`` and ``timestamp`` for video frames, and with
    ``with_images`` the decoded ``image`` (CPU; integer pixels for files). An item that cannot be
    read gives ``{"error": message, ...}`` instead of detections; the caller decides whether to stop.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if mask_format not in MASK_FORMATS:
        raise ValueError(f"mask_format must be one of {MASK_FORMATS}, got {mask_format!r}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    indices = list(range(len(items))) if indices is None else list(indices)
    categories = list(getattr(model, "categories", []))
    min_side = getattr(getattr(model, "transform", None), "min_image_side", 1)
    autocast = (torch.autocast(device.type, dtype=half_dtype(device)) if half else contextlib.nullcontext())

    def infer(images: List[Tensor], infos: List[Result]) -> Iterator[Result]:
        with autocast:
            outputs = run_model(model, [to_float(im.to(device, non_blocking=True)) for im in images],
                                {**(mode or {}), "mask_format": mask_format})
        for image, info, out in zip(images, infos, outputs):
            if with_images:
                info["image"] = image
            yield {**_finish(out, categories, mask_format), **info}

    start = 0
    while start < len(items):
        if is_video(items[start]):
            path = os.fspath(items[start])
            base = {"input_index": indices[start], "file_name": path}
            images, infos = [], []
            try:
                for frame_index, timestamp, frame in video_frames(path):
                    small = too_small(frame, min_side, path)
                    if small:
                        raise ValueError(small)
                    images.append(frame)
                    infos.append({**base, "frame_index": frame_index, "timestamp": round(timestamp, 6)})
                    if len(images) == batch_size:
                        yield from infer(images, infos)
                        images, infos = [], []
            except ValueError as e:
                yield {**base, "error": str(e)}
            if images:
                yield from infer(images, infos)
            start += 1
            continue
        stop = start
        while stop < len(items) and not is_video(items[stop]):
            stop += 1
        segment = items[start:stop]
        in_memory = any(not isinstance(x, (str, os.PathLike)) for x in segment)
        workers = 0 if in_memory else (default_num_workers() if num_workers is None else num_workers)
        workers = min(workers, (len(segment) - 1) // batch_size)  # no process for a single batch
        loader = torch.utils.data.DataLoader(ImageInputs(segment), batch_size=batch_size,
                                             num_workers=workers, collate_fn=as_list,
                                             pin_memory=device.type == "cuda")
        for batch in loader:
            images, infos = [], []
            for i, image, error in batch:
                item = segment[i]
                info: Result = {"input_index": indices[start + i]}
                if isinstance(item, (str, os.PathLike)):
                    info["file_name"] = os.fspath(item)
                if image is not None:
                    error = too_small(image, min_side, info.get("file_name", f"input {indices[start + i]}"))
                    image = None if error else image
                if image is None:
                    yield {**info, "error": error}
                else:
                    images.append(image)
                    infos.append(info)
            if images:
                yield from infer(images, infos)
        start = stop


def predict(model: nn.Module, inputs: Any, score_thresh: Optional[float] = None, *,
            batch_size: int = 1, device: Union[str, torch.device, None] = None, progress: bool = False,
            stream: bool = False, num_workers: Optional[int] = None, half: bool = False,
            mask_format: str = "uint8", slice: Optional[int] = None, overlap: float = 0.2,
            full_image: bool = True, tta: bool = False, backend: str = "torch"
            ) -> Union[Result, List[Result], Iterator[Result]]:
    """Run a detector on one image or many.

    ``inputs``: an image (path, http(s) URL, PIL image, HWC uint8 RGB array, CHW tensor), a
    folder, glob pattern or video file, or a list of these. Returns one result for one image,
    else a list, or with ``stream=True`` a generator that yields each result as its batch is done
    and keeps nothing. Each result: {boxes (N, 4) xyxy, labels, scores[, masks], names (category
    names), input_index[, file_name][, frame_index, timestamp]}; masks are (N, 1, H, W) uint8 at
    the image's size, or COCO RLE dicts with ``mask_format="rle"``.

    ``score_thresh`` replaces the model's box score threshold for this call (detections must
    score above it). Files are decoded in ``num_workers`` DataLoader workers (default: half the
    cores, at most 4) and run ``batch_size`` at a time. ``half=True`` runs the model under
    autocast (float16 on CUDA, bfloat16 on the CPU); results are float32 either way. An
    unreadable file raises ValueError naming it. The model is put in eval mode.
    ``slice``: sliced inference in SxS tiles overlapping by ``overlap`` (plus the whole image when
    ``full_image``); ``tta``: test-time augmentation (see ``hrnetdet.inference.modes``).
    ``backend``: see ``optimize_for_inference`` (a runtime backend works on a copy of the model, on
    sessions kept with ``model`` for the next call; ``runtime.close_runtime(model)`` releases them).
    """
    check_mode(slice, overlap, tta)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    single = _is_single(inputs)
    items = _flatten(inputs)
    model.eval()
    if backend != "torch":
        from .runtime import runtime_copy
        model = runtime_copy(model, backend)
    model.to(device)
    results = _stream(model, items, score_thresh, batch_size=batch_size, device=device, progress=progress,
                      num_workers=num_workers, half=half, mask_format=mask_format,
                      mode=dict(slice=slice, overlap=overlap, full_image=full_image, tta=tta))
    if stream:
        return results
    out = list(results)
    return out[0] if single and len(out) == 1 else out


def _stream(model: nn.Module, items: List[Any], score_thresh: Optional[float], *, progress: bool,
            **kwargs: Any) -> Iterator[Result]:
    """``iter_predictions`` with the score threshold override, no_grad, a progress bar, and
    unreadable inputs raised."""
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=None if any(is_video(x) for x in items) else len(items), unit="img")
    try:
        with score_threshold(model, score_thresh), torch.no_grad():
            for res in iter_predictions(model, items, **kwargs):
                if "error" in res:
                    raise ValueError(res["error"])
                if bar is not None:
                    bar.update(1)
                yield res
    finally:
        if bar is not None:
            bar.close()
