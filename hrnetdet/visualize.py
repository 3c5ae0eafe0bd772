"""Pictures of detections: masks, boxes and "name score" labels drawn over the image, legible at
any image size (font and line width scale with the image; labels sit on a filled background and
stay inside the picture), and grids of such pictures at a readable tile size."""
import colorsys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.utils import draw_segmentation_masks, make_grid

from .data.images import load_image

MIN_FONT_SIZE = 10


def _colour(label: int) -> Tuple[int, int, int]:
    # A fixed, well-spread hue per label (golden-angle steps), so a class keeps its colour.
    r, g, b = colorsys.hsv_to_rgb((label * 0.618033988749895) % 1.0, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def _text_colour(background: Tuple[int, int, int]) -> Tuple[int, int, int]:
    luma = 0.299 * background[0] + 0.587 * background[1] + 0.114 * background[2]
    return (0, 0, 0) if luma > 140 else (255, 255, 255)


def _decoded(rles: Sequence[Dict[str, Any]], height: int, width: int) -> Tensor:
    """COCO RLE dicts (``counts`` as text, as ``predict`` returns them) as (N, 1, H, W) uint8;
    ``height`` and ``width`` size the empty result."""
    if not rles:
        return torch.zeros((0, 1, height, width), dtype=torch.uint8)
    from pycocotools import mask as mask_utils
    decoded = mask_utils.decode([{"size": m["size"], "counts": m["counts"].encode("ascii")} for m in rles])
    return torch.from_numpy(np.ascontiguousarray(decoded.transpose(2, 0, 1)))[:, None]


def _masks(result: Dict[str, Any], keep: Tensor, height: int, width: int) -> Optional[Tensor]:
    """The kept masks as (N, H, W) bool, from uint8/float (N, 1, H, W) tensors or RLE dicts."""
    masks = result.get("masks")
    if masks is None:
        return None
    if isinstance(masks, (list, tuple)):
        return _decoded([masks[i] for i in torch.where(keep)[0].tolist()], height, width)[:, 0] > 0
    masks = masks.cpu()[keep][:, 0]
    return masks >= 0.5 if masks.is_floating_point() else masks > 0


def draw(image: Any, result: Dict[str, Any], score_thresh: float = 0.0, mask_alpha: float = 0.45,
         width: Optional[int] = None, font_size: Optional[int] = None) -> Tensor:
    """Draw a ``predict`` result (or any {boxes, labels, scores[, masks, names]}) on ``image``
    (anything ``predict`` accepts). Line ``width`` and ``font_size`` default to sizes that scale
    with the image. Returns a CHW uint8 tensor; ``torchvision.io.write_jpeg`` or
    ``torchvision.transforms.functional.to_pil_image`` save it."""
    from PIL import Image, ImageDraw, ImageFont

    img = image if isinstance(image, Tensor) and image.dtype == torch.uint8 else \
        (load_image(image).clamp(0, 1) * 255).round().to(torch.uint8)
    img = img.cpu()
    height, width_px = int(img.shape[-2]), int(img.shape[-1])
    keep = result["scores"].cpu() >= score_thresh
    if not keep.any():
        return img
    boxes = result["boxes"].cpu()[keep].float()
    labels = result["labels"].cpu()[keep].tolist()
    scores = result["scores"].cpu()[keep].tolist()
    names = result.get("names")
    names = [names[i] for i in torch.where(keep)[0].tolist()] if names is not None else [str(i) for i in labels]
    colours = [_colour(lab) for lab in labels]
    masks = _masks(result, keep, height, width_px)
    if masks is not None and len(masks):
        img = draw_segmentation_masks(img, masks, alpha=mask_alpha, colors=colours)

    side = max(height, width_px)
    width = width or max(1, round(side / 320))
    font = ImageFont.load_default(size=font_size or max(MIN_FONT_SIZE, round(side / 40)))
    picture = Image.fromarray(img.permute(1, 2, 0).numpy())
    pen = ImageDraw.Draw(picture)
    for box, name, score, colour in zip(boxes.tolist(), names, scores, colours):
        x0, y0, x1, y1 = (min(max(v, 0.0), lim - 1.0) for v, lim in zip(box, (width_px, height) * 2))
        pen.rectangle((x0, y0, x1, y1), outline=colour, width=width)
        text = f"{name} {score:.2f}"
        left, top, right, bottom = pen.textbbox((0, 0), text, font=font)
        tw, th = right - left + 2 * width, bottom - top + 2 * width
        # Above the box when there is room, else just inside its top; always inside the picture.
        tx = min(max(x0, 0.0), max(width_px - tw, 0.0))
        ty = y0 - th if y0 - th >= 0 else min(y0, max(height - th, 0.0))
        pen.rectangle((tx, ty, tx + tw - 1, ty + th - 1), fill=colour)
        pen.text((tx + width - left, ty + width - top), text, fill=_text_colour(colour), font=font)
    return torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1)


def _scaled(result: Dict[str, Any], factor: float, size: Tuple[int, int]) -> Dict[str, Any]:
    """A result for the image resized by ``factor`` to ``size`` (H, W)."""
    scaled = {**result, "boxes": result["boxes"].cpu().float() * factor}
    masks = result.get("masks")
    if masks is not None and not isinstance(masks, Tensor):
        masks = scaled["masks"] = _decoded(masks, *size)  # none: empty at the new size already
    if isinstance(masks, Tensor) and len(masks):
        scaled["masks"] = F.interpolate(masks.cpu().float(), size=size, mode="nearest")
    return scaled


def draw_tiles(images: Sequence[Any], results: Sequence[Dict[str, Any]], tile: int = 320, columns: int = 4,
               score_thresh: float = 0.0) -> Tensor:
    """A grid of pictures: each image scaled so its longer side is ``tile`` pixels, then drawn (so
    labels are legible however small the images are), on white gaps. CHW uint8."""
    tiles: List[Tensor] = []
    for image, result in zip(images, results):
        img = (load_image(image).clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        h, w = int(img.shape[-2]), int(img.shape[-1])
        factor = tile / max(h, w)
        size = (max(1, round(h * factor)), max(1, round(w * factor)))
        img = F.interpolate(img[None].float(), size=size, mode="bilinear", align_corners=False)[0]
        picture = draw(img.round().clamp(0, 255).to(torch.uint8), _scaled(result, factor, size),
                       score_thresh=score_thresh)
        canvas = torch.full((3, tile, tile), 255, dtype=torch.uint8)
        canvas[:, :size[0], :size[1]] = picture
        tiles.append(canvas)
    return make_grid(tiles, nrow=columns, padding=4, pad_value=255)
