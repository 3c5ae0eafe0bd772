"""The answer of ``POST /predict``: the image's size and its detections in the Hugging Face
object-detection pipeline's fields (``label``, ``score``, ``box``) plus the dataset's
``category_id``, the model's ``label_id`` and, for mask models, the mask as COCO compressed RLE
(``data.results.mask_rle``: text a few hundred bytes long where the full mask as JSON lists takes
megabytes and seconds). ``schema/predict_response.json`` describes it; the client reads it back."""
import json
from importlib import resources
from typing import Any, Dict, List, Optional, Sequence

import numpy as np


def predict_response(result: Dict[str, Any], width: int, height: int, category_ids: Optional[Sequence[int]],
                     masks: bool) -> Dict[str, Any]:
    """One ``hrnetdet.predict`` result (masks as RLE dicts when ``masks``) as the API's record,
    detections by score, best first (ties in the model's order)."""
    boxes = [shortest(row) for row in result["boxes"].numpy()]
    scores = shortest(result["scores"].numpy())
    labels = result["labels"].tolist()
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    detections: List[Dict[str, Any]] = []
    for i in order:
        label = int(labels[i])
        xmin, ymin, xmax, ymax = boxes[i]
        record = {"label": result["names"][i], "score": scores[i],
                  "box": {"xmin": xmin, "ymin": ymin, "xmax": xmax, "ymax": ymax},
                  "category_id": int(category_ids[label - 1]) if category_ids else label, "label_id": label}
        if masks:
            record["mask"] = result["masks"][i]
        detections.append(record)
    return {"width": int(width), "height": int(height), "detections": detections}


def shortest(values: np.ndarray) -> List[float]:
    """float32 values as the shortest decimals that read back as the same float32: the client gets
    ``predict``'s exact numbers (so a remote run's files equal a local run's) in fewer bytes."""
    return [float(np.format_float_positional(v, unique=True, trim="-")) for v in values.astype(np.float32)]


def response_schema() -> Dict[str, Any]:
    """The JSON Schema (draft 2020-12) of ``predict_response``, shipped in the package."""
    return json.loads(resources.files(__package__).joinpath("schema", "predict_response.json").read_text())
