"""The ways to run a detector at test time, behind one call that ``predict``, ``evaluate`` and the
CLI share: plain (the model's own forward), sliced (``slicing.py``) or with test-time augmentation
(``tta.py``). The choice is a ``PredictOptions`` record, checked when it was made."""
import argparse
from typing import Any, Dict, List, Sequence

from torch import Tensor, nn

from .options import PredictOptions
from .slicing import sliced_predict
from .tta import tta_predict


def detect(model: nn.Module, images: Sequence[Tensor], options: PredictOptions) -> List[Dict[str, Any]]:
    """The model's results on CHW images: plain, sliced into ``options.slice`` square tiles
    (``overlap``, plus the whole image when ``full_image``) or with TTA; the model is in eval mode.
    Sliced inference pastes masks itself, into ``mask_format`` (``sliced_predict``); the other
    modes return the model's float masks."""
    if options.slice is not None:
        return [sliced_predict(model, im, options.slice, options.overlap, full_image=options.full_image,
                               mask_format=options.mask_format) for im in images]
    if options.tta:
        return [tta_predict(model, im) for im in images]
    return model(list(images))


def mode_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """The mode fields of ``PredictOptions`` from the parsed ``--slice``/``--overlap``/``--no-full-image``/``--tta``."""
    return {"slice": args.slice, "overlap": args.overlap, "full_image": args.full_image, "tta": args.tta}
