"""Half-precision inputs to the box arithmetic.

Under autocast (or with half weights) the heads' convolutions and linear layers return float16 or
bfloat16. Box coordinates of ~1000 px held in float16 are 0.5 px apart, in bfloat16 4 px, and the
class-wise NMS shifts boxes by up to ~80 times their size; so anchors, box deltas, scores and mask
pasting stay in float32, whatever precision the layers ran in."""
import torch
from torch import Tensor


def float32_if_half(t: Tensor) -> Tensor:
    """``t`` in float32 if it is float16 or bfloat16, else unchanged (float32 and float64 pass)."""
    if t.dtype == torch.float16 or t.dtype == torch.bfloat16:
        return t.float()
    return t
