"""The ways to run a detector at test time, behind one call that ``predict``, ``evaluate`` and the
CLI share: plain (the model's own forward), sliced (``slicing.py``) or with test-time augmentation
(``tta.py``)."""
import argparse
from typing import Any, Dict, List, Optional, Sequence

from torch import Tensor, nn

from .slicing import sliced_predict
from .tta import tta_predict


def check_mode(slice: Optional[int] = None, overlap: float = 0.2, tta: bool = False) -> None:
    """Reject settings that cannot run, before any image is read."""
    if slice is not None and slice < 1:
        raise ValueError(f"slice must be a positive tile side in pixels, got {slice}")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if slice is not None and tta:
        raise ValueError("slice and tta do not combine: choose sliced inference or test-time augmentation")


def detect(model: nn.Module, images: Sequence[Tensor], *, slice: Optional[int] = None, overlap: float = 0.2,
           full_image: bool = True, tta: bool = False, mask_format: str = "uint8") -> List[Dict[str, Any]]:
    """The model's results on CHW images: plain, sliced into ``slice`` x ``slice`` tiles
    (``overlap``, plus the whole image when ``full_image``) or with TTA; the model is in eval mode.
    Sliced inference pastes masks itself, into ``mask_format`` (``sliced_predict``); the other
    modes return the model's float masks."""
    check_mode(slice, overlap, tta)
    if slice is not None:
        return [sliced_predict(model, im, slice, overlap, full_image=full_image, mask_format=mask_format)
                for im in images]
    if tta:
        return [tta_predict(model, im) for im in images]
    return model(list(images))


def mode_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """The ``detect`` settings from the parsed ``--slice``/``--overlap``/``--no-full-image``/``--tta`` options."""
    return {"slice": args.slice, "overlap": args.overlap, "full_image": args.full_image, "tta": args.tta}
