"""Category names and dataset ids: COCO's 80 detection categories in the reference's label order,
with their dataset ids, and the rules that fill in names and ids a model or dataset leaves out."""
from typing import List, Optional, Sequence

COCO_CATEGORY_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
    "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave",
    "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)

COCO_CATEGORY_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28,
    31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55,
    56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84,
    85, 86, 87, 88, 89, 90,
)

BACKGROUND = "__background__"

# torchvision's convention: index 0 is the background, labels 1..80 are the categories above.
COCO_CATEGORIES = (BACKGROUND,) + COCO_CATEGORY_NAMES


def categories_for(num_classes: int, names: Optional[Sequence[str]] = None) -> List[str]:
    """Category names with the background first: ``names`` (the background is added when missing)
    when they fit ``num_classes``, else COCO's for 81 classes, else ``class_1``..."""
    if names:
        names = list(names)
        if names[0] != BACKGROUND:
            names = [BACKGROUND] + names
        if len(names) == num_classes:
            return names
    if num_classes == len(COCO_CATEGORIES):
        return list(COCO_CATEGORIES)
    return [BACKGROUND] + [f"class_{i}" for i in range(1, num_classes)]


def category_ids_for(categories: Sequence[str], ids: Optional[Sequence[int]] = None) -> List[Optional[int]]:
    """Dataset category ids aligned with ``categories`` (None for the background): ``ids`` (one per
    foreground category, or aligned with the background's None first), else COCO's for COCO's
    categories, else the label indices."""
    if ids is not None:
        ids = [None if i is None else int(i) for i in ids]
        if len(ids) == len(categories) - 1:
            ids = [None] + ids
        if len(ids) != len(categories) or ids[0] is not None:
            raise ValueError(f"{len(ids)} category ids for {len(categories)} categories (with background)")
        return ids
    if tuple(categories) == COCO_CATEGORIES:
        return [None, *COCO_CATEGORY_IDS]
    return [None, *range(1, len(categories))]
