"""Pictures of detections: boxes, "name score" labels and masks drawn over the image."""
from typing import Any, Dict, Optional

import torch
from torch import Tensor
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks


def _colour(label: int) -> tuple:
    # A fixed, well-spread hue per label (golden-angle steps), so a class keeps its colour.
    import colorsys
    r, g, b = colorsys.hsv_to_rgb((label * 0.618033988749895) % 1.0, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def draw(image: Any, result: Dict[str, Any], score_thresh: float = 0.0, mask_alpha: float = 0.45,
         width: int = 2, font_size: Optional[int] = None) -> Tensor:
    """Draw a ``predict`` result (or any {boxes, labels, scores[, masks, names]}) on ``image``
    (anything ``predict`` accepts). Returns a CHW uint8 tensor; ``torchvision.io.write_jpeg`` or
    ``torchvision.transforms.functional.to_pil_image`` save it."""
    from .inference.predict import load_image

    img = (load_image(image).clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    keep = result["scores"].cpu() >= score_thresh
    boxes = result["boxes"].cpu()[keep]
    labels = result["labels"].cpu()[keep].tolist()
    scores = result["scores"].cpu()[keep].tolist()
    names = result.get("names")
    names = [names[i] for i in torch.where(keep)[0].tolist()] if names is not None else [str(i) for i in labels]
    colours = [_colour(lab) for lab in labels]
    if len(labels) == 0:
        return img
    if "masks" in result:
        masks = result["masks"].cpu()[keep][:, 0] >= 0.5
        img = draw_segmentation_masks(img, masks, alpha=mask_alpha, colors=colours)
    text = [f"{n} {s:.2f}" for n, s in zip(names, scores)]
    return draw_bounding_boxes(img, boxes, text, colors=colours, width=width, font_size=font_size)
