"""The inference side of ``hrnetdet serve``: the LitServe API class that each inference worker
process holds (one model each), and the batch runner it calls. A batch of requests runs as groups
of one image size and one set of options, each through ``hrnetdet.predict`` itself: an image's
answer never depends on its batch-mates (a batch of mixed sizes would pad every image to the
largest, which moves detections at the borders), and the API answers what ``predict`` answers."""
import json
import logging
import os
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import litserve as ls


class ModelSpec(NamedTuple):
    """How a worker builds its model (the ``predict`` command's model flags), and where it reports
    the model's description, or why it could not build it, to the server process."""
    model: str
    checkpoint_path: Optional[str]
    pretrained: Any
    settings: Dict[str, Any]
    backend: str
    fast: bool
    int8: Dict[str, Any]  # --int8's keywords (empty: float32)
    half: bool
    threads: int
    report_path: str


def build_model(spec: ModelSpec, device: str) -> Any:
    """The model of ``spec`` on ``device``, in eval mode, on the fast path or runtime asked for."""
    from ..inference.loading import load_model

    return load_model(spec.model, pretrained=spec.pretrained, checkpoint_path=spec.checkpoint_path,
                      backend=spec.backend, fast=spec.fast, int8=spec.int8, **spec.settings).to(device)


def describe(model: Any, spec: ModelSpec) -> Dict[str, Any]:
    """What ``GET /info`` says of the model: its name, categories, masks and default options."""
    from ..data.results import category_ids_of
    from ..detectors import has_masks
    from ..detectors.settings import model_settings
    from ..zoo.registry import get_family

    arch = getattr(model, "arch", spec.model)
    settings = model_settings(model)
    categories = list(getattr(model, "categories", []))
    return {"model": arch, "family": get_family(arch)[0].name, "categories": categories[1:],
            "category_ids": category_ids_of(model) or list(range(1, len(categories))),
            "masks": has_masks(model), "backend": spec.backend, "int8": bool(spec.int8), "half": spec.half,
            "min_side": getattr(model.transform, "min_image_side", 1),
            "options": {"score_thresh": settings.score_thresh, "max_det": settings.detections_per_img}}


def run_batch(model: Any, items: List[Dict[str, Any]], device: str, half: bool,
              category_ids: Optional[List[int]]) -> List[Dict[str, Any]]:
    """The API records of ``items`` (``{"image": CHW array, "options": PredictOptions, "masks": bool}``),
    in order, each with the size of the model run it was part of (``batch_size``)."""
    import torch

    from ..data.images import to_float
    from ..inference.predict import predict
    from .responses import predict_response

    groups: Dict[Tuple[Any, ...], List[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault((item["options"], item["masks"], item["image"].shape), []).append(i)
    answers: List[Dict[str, Any]] = [{}] * len(items)
    for (options, masks, shape), members in groups.items():
        images = [to_float(torch.from_numpy(items[i]["image"])) for i in members]
        options = options.replace(batch_size=len(members), num_workers=0, device=device, half=half)
        for i, result in zip(members, predict(model, images, options)):
            answers[i] = {"response": predict_response(result, shape[2], shape[1], category_ids, masks),
                          "batch_size": len(members)}
    return answers


class DetectorAPI(ls.LitAPI):
    """One inference worker's model behind LitServe's queue and batching loop. Requests arrive
    checked and decoded (``requests.py``, in the HTTP process), so nothing here can fail for one
    request of a batch and take its batch-mates down with it."""

    def __init__(self, spec: ModelSpec, max_batch_size: int, batch_timeout: float):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path="/predict")
        self.model_spec = spec

    def setup(self, device: str) -> None:
        from ..io import atomic_write_text
        from ..threads import set_num_threads

        set_num_threads(self.model_spec.threads)
        try:
            self.model = build_model(self.model_spec, device)
            info = describe(self.model, self.model_spec)
        except Exception as e:  # the server process reports it as the command's one-line error
            atomic_write_text(self.model_spec.report_path, json.dumps({"error": " ".join(str(e).split())
                                                                        or type(e).__name__}))
            logging.getLogger("litserve.loops").setLevel(logging.CRITICAL)  # not its traceback too
            raise
        self.category_ids = info["category_ids"]
        atomic_write_text(self.model_spec.report_path, json.dumps({"info": info, "pid": os.getpid()}))

    def predict(self, x: Any) -> Any:
        """A list of requests (LitServe's default batch) with batching on, else one request."""
        if self.max_batch_size > 1:
            return run_batch(self.model, x, self.device, self.model_spec.half, self.category_ids)
        return run_batch(self.model, [x], self.device, self.model_spec.half, self.category_ids)[0]
