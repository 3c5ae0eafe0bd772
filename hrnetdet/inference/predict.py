"""Prediction on image files, folders, globs, PIL images, numpy arrays and tensors, with results
that carry category names and a COCO-results writer."""
import glob
import os
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from .calibrate import score_thresholds, set_score_thresh

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
Result = Dict[str, Any]


def expand_inputs(inputs: Iterable[str]) -> List[str]:
    """Image files from paths, folders (their image files, sorted) and glob patterns."""
    paths: List[str] = []
    for item in inputs:
        item = os.fspath(item)
        if os.path.isdir(item):
            found = sorted(os.path.join(item, f) for f in os.listdir(item)
                           if f.lower().endswith(IMAGE_EXTENSIONS))
            if not found:
                raise FileNotFoundError(f"folder {item!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            paths += found
        elif os.path.isfile(item):
            paths.append(item)
        elif glob.has_magic(item):
            found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            if not found:
                raise FileNotFoundError(f"pattern {item!r} matches no files")
            paths += found
        else:
            raise FileNotFoundError(f"no such image file or folder: {item!r}")
    return paths


def load_image(image: Any, name: str = "image") -> Tensor:
    """A CHW float RGB tensor in [0, 1] from a path, a PIL image, an HWC uint8 RGB numpy array
    or a CHW tensor (uint8, or float in [0, 1]). ``name`` labels the input in errors."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except FileNotFoundError:
            raise FileNotFoundError(f"no such image file: {path!r}") from None
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"cannot read {path!r} as an image: {e}") from None
        name = path
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"{name}: numpy images must be HWC uint8 RGB, got shape {image.shape} "
                             f"dtype {image.dtype}")
        return torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div_(255)
    if isinstance(image, Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"{name}: tensor images must be CHW RGB, got shape {list(image.shape)}")
        if image.dtype == torch.uint8:
            return image.float().div_(255)
        if not image.is_floating_point():
            raise ValueError(f"{name}: tensor images must be uint8 or float, got {image.dtype}")
        return image
    raise TypeError(f"{name}: expected a path, PIL image, numpy array or tensor, got {type(image).__name__}")


def _is_single(inputs: Any) -> bool:
    if isinstance(inputs, (str, os.PathLike)):
        path = os.fspath(inputs)
        return not (os.path.isdir(path) or glob.has_magic(path))
    return not isinstance(inputs, (list, tuple))


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


@torch.no_grad()
def predict(model: nn.Module, inputs: Any, score_thresh: Optional[float] = None, *,
            batch_size: int = 1, device: Union[str, torch.device, None] = None,
            progress: bool = False, backend: str = "torch") -> Union[Result, List[Result]]:
    """Run a detector on one image or many.

    ``inputs``: an image (path, PIL image, HWC uint8 RGB array, CHW tensor), a folder or glob
    pattern, or a list of these. Returns one result for one image, else a list, each
    {boxes (N, 4) xyxy, labels, scores[, masks (N, 1, H, W)], names (category names),
    file_name (for paths)}. ``score_thresh`` replaces the model's box score threshold for this
    call (detections must score above it). The model is put in eval mode. ``backend``: see
    ``optimize_for_inference`` (a runtime backend works on a copy of the model).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    single = _is_single(inputs)
    items = [inputs] if single or isinstance(inputs, (str, os.PathLike)) else list(inputs)
    flat: List[Any] = []
    for item in items:
        is_path = isinstance(item, (str, os.PathLike))
        flat += expand_inputs([item]) if is_path else [item]
    model.eval()
    if backend != "torch":
        import copy

        from .fast import optimize_for_inference
        model = optimize_for_inference(copy.deepcopy(model), backend=backend)
    if device is None:
        device = next(model.parameters()).device
    model.to(device)
    categories = list(getattr(model, "categories", []))
    results: List[Result] = []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(flat), unit="img")
    saved = score_thresholds(model)
    if score_thresh is not None:
        set_score_thresh(model, score_thresh)
    try:
        for batch in _batches(flat, batch_size):
            images = [load_image(x, f"input {len(results) + i}").to(device) for i, x in enumerate(batch)]
            for item, out in zip(batch, model(images)):
                out = {k: v.cpu() for k, v in out.items()}
                out["names"] = [categories[i] if i < len(categories) else str(i) for i in out["labels"].tolist()]
                if isinstance(item, (str, os.PathLike)):
                    out["file_name"] = os.fspath(item)
                results.append(out)
            if bar is not None:
                bar.update(len(batch))
    finally:
        for m, t in saved.items():
            m.score_thresh = t
        if bar is not None:
            bar.close()
    return results[0] if single and len(results) == 1 else results


def coco_results(results: Sequence[Result], categories: Sequence[str]) -> List[Dict[str, Any]]:
    """COCO results-format records (xywh boxes, RLE masks), one per detection, with the image's
    ``file_name`` and the ``category_name``. Category ids are COCO's when ``categories`` are
    COCO's, else the label index; ``image_id`` is the result's position."""
    from pycocotools import mask as mask_utils

    from ..zoo.coco import COCO_CATEGORIES, COCO_CATEGORY_IDS

    is_coco = tuple(categories) == COCO_CATEGORIES
    records = []
    for image_id, res in enumerate(results):
        boxes = res["boxes"].tolist()
        masks = res.get("masks")
        for k, (box, label, score) in enumerate(zip(boxes, res["labels"].tolist(), res["scores"].tolist())):
            rec = {"image_id": image_id, "file_name": res.get("file_name", ""),
                   "category_id": COCO_CATEGORY_IDS[label - 1] if is_coco else label,
                   "category_name": res["names"][k],
                   "bbox": [round(box[0], 2), round(box[1], 2), round(box[2] - box[0], 2), round(box[3] - box[1], 2)],
                   "score": round(score, 5)}
            if masks is not None:
                rle = mask_utils.encode(np.asfortranarray(masks[k, 0].numpy() >= 0.5, dtype=np.uint8))
                rle["counts"] = rle["counts"].decode("ascii")
                rec["segmentation"] = rle
            records.append(rec)
    return records
