"""SAHI (sahi.predict.get_sliced_prediction) on an hrnetdet model, through
``detection_model(model, slice_size=512)``.

SAHI's own torchvision wrapper needs three things done by hand for an hrnetdet model, and changes
the model behind the user's back: its ``image_size`` must be set to the slice size (else tiles go
through the model's test scale, short side 800), its ``category_mapping`` must be built (else every
label gets a COCO name), and it leaves ``transform.min_size`` changed after the call. Here:

- tiles (no side above ``slice_size``) run at native resolution, as ``hrnetdet.predict(slice=...)``
  runs them; a larger image (SAHI's ``perform_standard_pred`` pass) at the model's test scale;
- the model's score threshold is SAHI's ``confidence_threshold`` during the call;
- both through ``temporary_settings``, so that ``model.settings`` and the modules are as they were
  after every call (and the model keeps its device and train/eval modes);
- SAHI's results carry the dataset's category ids (``model.category_ids``) and names
  (``model.categories``, without the background);
- mask models give SAHI their masks; a detection whose mask has no polygon (empty, or too thin for
  one) is kept with its box only, where SAHI's wrapper stops with "Invalid segmentation mask".

Note that SAHI replaces a masked detection's box by its mask polygon's bounds.
Needs ``pip install "hrnetdet[sahi]"``."""
import contextlib
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch
from torch import nn

try:
    from sahi.models.torchvision import TorchVisionDetectionModel
    from sahi.prediction import ObjectPrediction
    from sahi.utils.cv import get_bbox_from_coco_segmentation, get_coco_segmentation_from_bool_mask
except ImportError as e:  # the optional extra
    raise ImportError('hrnetdet.integrations.sahi needs SAHI: pip install "hrnetdet[sahi]"') from e

from ..data.images import load_image
from ..detectors.settings import model_settings, temporary_settings


def category_mapping(model: nn.Module) -> Dict[str, str]:
    """SAHI's mapping (category id as a string -> name): the model's categories without the
    background, keyed by their dataset ids."""
    return {str(cid): name for cid, name in zip(model.category_ids[1:], model.categories[1:])}


@contextlib.contextmanager
def eval_modes(model: nn.Module) -> Iterator[None]:
    """The model in eval mode within the block; every module's own mode restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _polygons(mask: np.ndarray) -> Optional[List[List[float]]]:
    """SAHI's COCO polygons of a bool mask, or None when it has none SAHI can bound."""
    segmentation = get_coco_segmentation_from_bool_mask(mask)
    return segmentation if get_bbox_from_coco_segmentation(segmentation) is not None else None


class HrnetdetDetectionModel(TorchVisionDetectionModel):
    """SAHI's torchvision wrapper for an hrnetdet model (see the module's docstring)."""

    def __init__(self, model: nn.Module, slice_size: int, **kwargs: Any):
        model_settings(model)  # refuses a model built elsewhere, naming what it lacks
        self.slice_size = int(slice_size)
        super().__init__(model=model, category_mapping=category_mapping(model), load_at_init=True, **kwargs)

    def set_model(self, model: nn.Module, **kwargs: Any) -> None:
        """Keeps the model as it is (SAHI's sets eval mode for good); moved only to a ``device`` given."""
        if next(model.parameters()).device != self.device:
            model.to(self.device)
        self.model = model

    @property
    def has_mask(self) -> bool:
        return any(getattr(m, "mask_predictor", None) is not None for m in self.model.modules())

    def _test_scale(self, height: int, width: int) -> Dict[str, Any]:
        """A tile at scale 1 (the transform's short and long side = the tile's); a whole image as built."""
        if max(height, width) > self.slice_size:
            return {}
        return {"min_size": (min(height, width),), "max_size": max(height, width)}

    @torch.no_grad()
    def perform_inference(self, image: np.ndarray, image_size: Optional[int] = None) -> None:
        """The model's result on one HWC uint8 RGB image, labels turned into dataset category ids."""
        tensor = load_image(np.ascontiguousarray(image)).to(self.device)
        changes = dict(self._test_scale(*image.shape[:2]), score_thresh=float(self.confidence_threshold))
        with temporary_settings(self.model, **changes), eval_modes(self.model):
            result = self.model([tensor])[0]
        ids = torch.tensor([-1] + [int(i) for i in self.model.category_ids[1:]], device=result["labels"].device)
        self._original_predictions = [dict(result, labels=ids[result["labels"]])]

    def _create_object_prediction_list_from_original_predictions(
            self, shift_amount_list: Optional[List[List[float]]] = None,
            full_shape_list: Optional[List[List[int]]] = None) -> None:
        """SAHI's records of the one image's result; masks as polygons, box-only without one."""
        shift = (shift_amount_list or [[0, 0]])[0]
        shift = shift_amount_list if isinstance(shift, (int, float)) else shift  # SAHI's old flat form
        full_shape = None if full_shape_list is None else full_shape_list[0]
        full_shape = full_shape_list if isinstance(full_shape, (int, float)) else full_shape
        result = self._original_predictions[0]
        keep = result["scores"] > self.confidence_threshold
        boxes, scores = result["boxes"][keep].tolist(), result["scores"][keep].tolist()
        ids = result["labels"][keep].tolist()
        masks = result.get("masks")
        masks = None if masks is None else (masks[keep, 0] > self.mask_threshold).cpu().numpy()
        self._object_prediction_list_per_image = [[
            ObjectPrediction(bbox=box, segmentation=None if masks is None else _polygons(masks[i]),
                             category_id=cid, category_name=self.category_mapping[str(cid)],
                             shift_amount=list(shift), score=score, full_shape=full_shape)
            for i, (box, score, cid) in enumerate(zip(boxes, scores, ids))]]


def detection_model(model: nn.Module, slice_size: int, confidence_threshold: float = 0.3,
                    device: Optional[str] = None, **kwargs: Any) -> HrnetdetDetectionModel:
    """A SAHI DetectionModel running ``model`` (an hrnetdet detector) for
    ``get_sliced_prediction(image, it, slice_height=slice_size, slice_width=slice_size, ...)``.
    ``device``: the model's own by default (given, the model is moved there); other keywords
    (``mask_threshold``...) are SAHI's, but for its ``image_size`` (see the module's docstring)."""
    if "image_size" in kwargs:
        raise TypeError("detection_model: image_size is not used: tiles run at native resolution and "
                        "a larger image at the model's test scale (set it with hrnetdet.set_settings)")
    if device is None:
        device = str(next(model.parameters()).device)
    return HrnetdetDetectionModel(model, slice_size, confidence_threshold=confidence_threshold,
                                  device=device, **kwargs)
