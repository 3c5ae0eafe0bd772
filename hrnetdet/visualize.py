"""Pictures of detections: masks, boxes and "name score" labels drawn over the image, legible at
any image size without hiding what they name (each label's text and box line follow the box's
size, within limits set by the picture's size; labels sit on a filled background and stay inside
the picture), and grids of such pictures at a readable tile size."""
import colorsys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.utils import draw_segmentation_masks, make_grid

from .data.images import load_image

MIN_FONT_SIZE = 10  # px: the smallest legible label
LABEL_BOX_FRACTION = 0.3  # a label's text is at most this fraction of its box's height...
LABEL_PICTURE_FRACTION = 1 / 30  # ...and of the picture's height (a big box's label stays a label)
LINE_BOX_FRACTION = 1 / 30  # a box's line is at most this fraction of its shorter side...
LINE_PICTURE_FRACTION = 1 / 320  # ...and of the picture's longer side


def label_size_for(box_height: float, picture_height: int) -> int:
    """The label text size (px) for a box: a small object's label stays small (it would cover
    the object), clamped to [MIN_FONT_SIZE, a fraction of the picture's height]."""
    return max(MIN_FONT_SIZE, min(round(box_height * LABEL_BOX_FRACTION),
                                  round(picture_height * LABEL_PICTURE_FRACTION)))


def line_width_for(box_side: float, picture_side: int) -> int:
    """The box line width (px) for a box whose shorter side is ``box_side``: at least 1."""
    return max(1, min(round(box_side * LINE_BOX_FRACTION), round(picture_side * LINE_PICTURE_FRACTION)))


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
         line_width: Optional[int] = None, label_size: Optional[int] = None) -> Tensor:
    """Draw a ``predict`` result (or any {boxes, labels, scores[, masks, names]}) on ``image``
    (anything ``predict`` accepts). ``line_width`` and ``label_size`` (px) default to sizes that
    follow each box (``line_width_for``, ``label_size_for``). Returns a CHW uint8 tensor;
    ``torchvision.io.write_jpeg`` or ``torchvision.transforms.functional.to_pil_image`` save it."""
    from PIL import Image, ImageDraw

    img = image if isinstance(image, Tensor) and image.dtype == torch.uint8 else \
        (load_image(image).clamp(0, 1) * 255).round().to(torch.uint8)
    img = img.cpu()
    height, width = int(img.shape[-2]), int(img.shape[-1])
    keep = result["scores"].cpu() >= score_thresh
    if not keep.any():
        return img
    boxes = result["boxes"].cpu()[keep].float()
    labels = result["labels"].cpu()[keep].tolist()
    scores = result["scores"].cpu()[keep].tolist()
    names = result.get("names")
    names = [names[i] for i in torch.where(keep)[0].tolist()] if names is not None else [str(i) for i in labels]
    colours = [_colour(lab) for lab in labels]
    masks = _masks(result, keep, height, width)
    if masks is not None and len(masks):
        img = draw_segmentation_masks(img, masks, alpha=mask_alpha, colors=colours)
    picture = Image.fromarray(img.permute(1, 2, 0).numpy())
    pen = ImageDraw.Draw(picture)
    for box, name, score, colour in zip(boxes.tolist(), names, scores, colours):
        x0, y0, x1, y1 = (min(max(v, 0.0), lim - 1.0) for v, lim in zip(box, (width, height) * 2))
        line = line_width or line_width_for(min(x1 - x0, y1 - y0), max(height, width))
        pen.rectangle((x0, y0, x1, y1), outline=colour, width=line)
        _label(pen, f"{name} {score:.2f}", (x0, y0), colour, _font(label_size or label_size_for(y1 - y0, height)),
               line, (width, height))
    return torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1)


_FONTS: Dict[int, Any] = {}


def _font(size: int) -> Any:
    """PIL's default font at ``size`` px, loaded once per size."""
    from PIL import ImageFont

    if size not in _FONTS:
        _FONTS[size] = ImageFont.load_default(size=size)
    return _FONTS[size]


def _label(pen: Any, text: str, corner: Tuple[float, float], colour: Tuple[int, int, int], font: Any, pad: int,
           picture: Tuple[int, int]) -> None:
    """``text`` on a filled band at a box's top-left ``corner``: above the box when there is
    room, else just inside its top; always inside the ``picture`` (width, height)."""
    (x0, y0), (width, height) = corner, picture
    left, top, right, bottom = pen.textbbox((0, 0), text, font=font)
    tw, th = right - left + 2 * pad, bottom - top + 2 * pad
    tx = min(max(x0, 0.0), max(width - tw, 0.0))
    ty = y0 - th if y0 - th >= 0 else min(y0, max(height - th, 0.0))
    pen.rectangle((tx, ty, tx + tw - 1, ty + th - 1), fill=colour)
    pen.text((tx + pad - left, ty + pad - top), text, fill=_text_colour(colour), font=font)


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
