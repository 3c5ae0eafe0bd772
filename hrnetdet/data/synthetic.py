"""A small synthetic COCO-format dataset (filled shapes with masks on noisy backgrounds), for the
demo and the tests: it exercises polygon and RLE masks and needs no download."""
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

# name -> (COCO category id, RGB colour). Non-contiguous ids on purpose: the dataset maps them.
SHAPES: Dict[str, Tuple[int, Tuple[int, int, int]]] = {
    "circle": (3, (220, 40, 40)),
    "square": (7, (40, 200, 60)),
    "triangle": (11, (50, 80, 230)),
}


def shape_outline(kind: str, cx: float, cy: float, r: float) -> List[Tuple[float, float]]:
    """A square's or triangle's polygon around (cx, cy) at radius r; none for a circle (drawn as an ellipse)."""
    if kind == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if kind == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    return []


def _draw_image(rng: np.random.Generator, width: int, height: int, max_objects: int,
                min_radius: int, max_radius: int) -> Tuple[Image.Image, List[dict]]:
    base = rng.integers(60, 200, size=3)
    noise = rng.normal(0, 18, size=(height, width, 3))
    pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
    objects: List[dict] = []
    taken: List[Tuple[float, float, float]] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(20):  # rejection sampling: shapes do not overlap
            r = float(rng.uniform(min_radius, max_radius))
            cx, cy = float(rng.uniform(r, width - r)), float(rng.uniform(r, height - r))
            if all(abs(cx - x) > r + rr + 2 or abs(cy - y) > r + rr + 2 for x, y, rr in taken):
                break
        else:
            continue
        taken.append((cx, cy, r))
        kind = list(SHAPES)[int(rng.integers(len(SHAPES)))]
        colour = tuple(int(c) for c in np.clip(np.array(SHAPES[kind][1]) + rng.integers(-25, 26, 3), 0, 255))
        if kind == "circle":
            mask_img = Image.new("L", (width, height), 0)
            ImageDraw.Draw(mask_img).ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
            mask = np.array(mask_img, dtype=np.uint8)
        else:  # rasterised as pycocotools does, so image, mask and polygon agree exactly
            poly = [c for pt in shape_outline(kind, cx, cy, r) for c in pt]
            mask = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([poly], height, width)))
        pixels[mask.astype(bool)] = colour
        objects.append({"kind": kind, "mask": mask, "polygon": shape_outline(kind, cx, cy, r)})
    return Image.fromarray(pixels), objects


def make_shapes_dataset(root: str, split: str, num_images: int, *, seed: int = 0,
                        sizes: Sequence[Tuple[int, int]] = ((160, 128), (128, 160), (144, 144)),
                        max_objects: int = 3, min_radius: int = 12, max_radius: int = 30,
                        categories: Optional[Sequence[str]] = None) -> Tuple[str, str]:
    """Write ``root/split/*.png`` and ``root/split.json``; returns (annotation file, image folder).

    Circles carry compressed-RLE masks, squares and triangles polygons; image sizes (width, height)
    cycle through ``sizes`` so that aspect-ratio grouping has work to do.
    """
    rng = np.random.default_rng(seed)
    names = list(categories or SHAPES)
    image_dir = os.path.join(root, split)
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        width, height = sizes[i % len(sizes)]
        img, objects = _draw_image(rng, width, height, max_objects, min_radius, max_radius)
        file_name = f"{i:05d}.png"
        img.save(os.path.join(image_dir, file_name))
        images.append({"id": i + 1, "file_name": file_name, "width": width, "height": height})
        for obj in objects:
            if obj["kind"] not in names:
                continue
            rle = mask_utils.encode(np.asfortranarray(obj["mask"]))
            x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
            if obj["kind"] == "circle":
                segmentation = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
            else:
                segmentation = [[float(c) for pt in obj["polygon"] for c in pt]]
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1,
                                "category_id": SHAPES[obj["kind"]][0], "bbox": [x, y, w, h],
                                "area": float(mask_utils.area(rle)), "iscrowd": 0,
                                "segmentation": segmentation})
    cats = [{"id": SHAPES[n][0], "name": n, "supercategory": "shape"} for n in names]
    ann_file = os.path.join(root, f"{split}.json")
    with open(ann_file, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": cats}, f)
    return ann_file, image_dir
