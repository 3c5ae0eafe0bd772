"""hrnetdet's own versions of torchvision's private detection helpers give torchvision's results."""
import torch
from torchvision.models.detection.rpn import RegionProposalNetwork

import hrnetdet


def test_rpn_top_n_idx_is_torchvisions():
    rpn = hrnetdet.create_model("faster_rcnn_hrnetv2p_w18", rpn_pre_nms_top_n_test=50).rpn.eval()
    levels = [120, 60, 30, 12, 3]  # the last two levels are smaller than top-n
    g = torch.Generator().manual_seed(0)
    objectness = torch.randn(2, sum(levels), generator=g)
    objectness[0, :40] = objectness[0, 40]  # ties
    ours = rpn.top_n_idx(objectness, levels)
    assert ours.shape == (2, 50 + 50 + 30 + 12 + 3)
    assert torch.equal(ours, RegionProposalNetwork._get_top_n_idx(rpn, objectness, levels))
