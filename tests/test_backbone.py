"""The native HRNet against timm's (the oracle), and the training options."""
import pytest
import timm
import torch
from torch import nn

from hrnetdet.backbone import HRNet


def _calibrated_timm(width: int, x: torch.Tensor) -> nn.Module:
    """timm's HRNet with random weights and BN statistics estimated on ``x`` (so features are O(1))."""
    model = timm.create_model(f"hrnet_w{width}", pretrained=False, features_only=True,
                              feature_location="", out_indices=(1, 2, 3, 4))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


@pytest.mark.parametrize("width", [18, 32, 40, 48])
def test_matches_timm_features(width):
    x = torch.randn(2, 3, 96, 128)
    oracle = _calibrated_timm(width, x)
    ours = HRNet(width).eval()
    ours.load_state_dict(oracle.state_dict(), strict=True)
    with torch.no_grad():
        expected, got = oracle(x), ours(x)
    assert len(got) == 4
    for level, (e, g) in enumerate(zip(expected, got)):
        stride = 4 * 2 ** level
        assert g.shape == (2, width * 2 ** level, 96 // stride, 128 // stride)
        assert 0.1 < e.std() < 100, "calibration failed: features are not O(1)"
        torch.testing.assert_close(g, e, rtol=0, atol=1e-5)


def test_parameter_counts_match_reference():
    # learnable backbone parameters per width (docs/NUMERICS.md, 'Parameter counts')
    for width, count in {18: 9_562_260, 32: 29_305_536, 40: 45_521_216}.items():
        with torch.device("meta"):
            model = HRNet(width)
        assert sum(p.numel() for p in model.parameters()) == count
        assert len(model.state_dict()) == 1830


def test_norm_eval_freezes_statistics_but_trains_affine():
    model = HRNet(18, norm_eval=True).train()
    bn = model.stage2[0].branches[0][0].bn1
    before = bn.running_mean.clone()
    out = model(torch.randn(1, 3, 64, 64))
    assert not bn.training
    torch.testing.assert_close(bn.running_mean, before)
    sum(o.mean() for o in out).backward()
    assert bn.weight.grad is not None and bn.weight.grad.abs().sum() > 0


def test_batchnorm_updates_without_norm_eval():
    model = HRNet(18, norm_eval=False).train()
    bn = model.bn1
    before = bn.running_mean.clone()
    model(torch.randn(2, 3, 64, 64))
    assert not torch.equal(bn.running_mean, before)


@pytest.mark.parametrize("frozen", [0, 1, 2, 4])
def test_frozen_stages(frozen):
    model = HRNet(18, frozen_stages=frozen).train()
    frozen_prefixes = ["conv1", "bn1", "conv2", "bn2", "layer1", "transition1", "stage2",
                       "transition2", "stage3", "transition3", "stage4"][: [4, 5, 7, 9, 11][frozen]]
    for name, p in model.named_parameters():
        assert p.requires_grad != name.startswith(tuple(p_ + "." for p_ in frozen_prefixes)), name
    with pytest.raises(ValueError, match="frozen_stages"):
        HRNet(18, frozen_stages=5)
