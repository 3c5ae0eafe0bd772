"""Anchors as the reference makes them: float base anchors (torchvision rounds them) and
fixed strides (torchvision infers ``padded // feature`` and gets 66 for HRFPN's floored stride-64 level).
See docs/NUMERICS.md, 'Anchor generator'."""
from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList


class ReferenceAnchorGenerator(nn.Module):
    """Anchors centred at ``(x * stride, y * stride)``, ordered (y, x, ratio) with the ratio fastest.

    Args:
        sizes: one anchor size (sqrt of area) per level.
        aspect_ratios: height / width ratios, the same on every level.
        strides: the feature stride of every level.
    """

    # Declared for TorchScript, which cannot infer the types of an empty dict.
    cell_anchors: List[Tensor]
    _cache: Dict[str, List[Tensor]]
    image_sizes: List[Tuple[int, int]]
    grid_sizes: List[Tuple[int, int]]

    def __init__(self, sizes: Sequence[float] = (32, 64, 128, 256, 512),
                 aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
                 strides: Sequence[int] = (4, 8, 16, 32, 64)):
        super().__init__()
        if len(sizes) != len(strides):
            raise ValueError(f"{len(sizes)} anchor sizes for {len(strides)} strides")
        self.strides = [int(s) for s in strides]
        ratios = torch.as_tensor(aspect_ratios, dtype=torch.float32)
        h_ratios = torch.sqrt(ratios)
        w_ratios = 1.0 / h_ratios
        bases = []
        for size in sizes:
            ws = w_ratios * float(size)
            hs = h_ratios * float(size)
            bases.append(torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=1))
        self.cell_anchors = bases
        self._cache: Dict[str, List[Tensor]] = {}
        self.image_sizes = []  # of the last batch; the RPN's allowed-border rule reads them
        self.grid_sizes = []   # ... and its valid flags these

    def num_anchors_per_location(self) -> List[int]:
        return [b.shape[0] for b in self.cell_anchors]

    def grid_anchors(self, grid_sizes: List[Tuple[int, int]], dtype: torch.dtype,
                     device: torch.device) -> List[Tensor]:
        anchors: List[Tensor] = []
        for (h, w), stride, base in zip(grid_sizes, self.strides, self.cell_anchors):
            shift_x = torch.arange(0, w, dtype=torch.int32, device=device).to(dtype) * stride
            shift_y = torch.arange(0, h, dtype=torch.int32, device=device).to(dtype) * stride
            yy, xx = torch.meshgrid(shift_y, shift_x, indexing="ij")
            xx, yy = xx.reshape(-1), yy.reshape(-1)
            shifts = torch.stack((xx, yy, xx, yy), dim=1)
            anchors.append((shifts.view(-1, 1, 4) + base.to(dtype=dtype, device=device).view(1, -1, 4))
                           .reshape(-1, 4))
        return anchors

    def forward(self, image_list: ImageList, feature_maps: List[Tensor]) -> List[Tensor]:
        self.image_sizes = list(image_list.image_sizes)
        grid_sizes = [(int(f.shape[-2]), int(f.shape[-1])) for f in feature_maps]
        self.grid_sizes = grid_sizes
        dtype = torch.float64 if feature_maps[0].dtype == torch.float64 else torch.float32  # see precision.py
        device = feature_maps[0].device
        key = f"{grid_sizes}{dtype}{device}"
        if key not in self._cache:
            self._cache = {key: self.grid_anchors(grid_sizes, dtype, device)}
        per_level = self._cache[key]
        one_image = torch.cat(per_level)
        return [one_image for _ in range(len(image_list.image_sizes))]

    def valid_flags(self, image_index: int, size_divisible: int, device: torch.device) -> Tensor:
        """The reference's valid flags for one image of the last batch: anchors at feature positions
        inside the image's own padded size (its side rounded up to ``size_divisible``, not the
        batch's), in the order of ``forward``'s anchors. Anchors beyond it lie in another image's
        padding and take no part in training."""
        h, w = self.image_sizes[image_index]
        pad_h = (h + size_divisible - 1) // size_divisible * size_divisible
        pad_w = (w + size_divisible - 1) // size_divisible * size_divisible
        flags: List[Tensor] = []
        for (fh, fw), stride, base in zip(self.grid_sizes, self.strides, self.cell_anchors):
            rows = torch.arange(fh, device=device) < min((pad_h + stride - 1) // stride, fh)
            cols = torch.arange(fw, device=device) < min((pad_w + stride - 1) // stride, fw)
            cell = rows[:, None] & cols[None, :]
            flags.append(cell.reshape(-1, 1).expand(fh * fw, base.shape[0]).reshape(-1))
        return torch.cat(flags)
