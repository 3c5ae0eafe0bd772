"""torch.hub.load(source="local") builds every family, with the registry's docstrings."""
import importlib.util
from pathlib import Path

import torch

import hrnetdet
from hrnetdet.zoo.registry import arch_name

REPO = str(Path(__file__).resolve().parents[1])


def test_hubconf_exposes_every_architecture_with_its_docstring():
    spec = importlib.util.spec_from_file_location("hubconf", Path(REPO) / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    entries = sorted(n for n in vars(hubconf) if callable(getattr(hubconf, n)) and not n.startswith("_"))
    assert entries == sorted(hrnetdet.list_models())
    name = "faster_rcnn_hrnetv2p_w32"
    assert getattr(hubconf, name).__doc__ == getattr(hrnetdet, name).__doc__
    assert "Weight tags: coco_1x, coco_2x" in getattr(hubconf, name).__doc__
    assert {"torch", "torchvision", "huggingface_hub", "safetensors"} <= set(hubconf.dependencies)


def test_hub_load_builds_every_family():
    """Iterates over the registry, so families added later are covered too (smallest width each)."""
    for family in hrnetdet.list_families():
        arch = arch_name(family.name, min(family.widths))
        model = torch.hub.load(REPO, arch, source="local", pretrained=False, num_classes=5)
        assert isinstance(model, torch.nn.Module) and model.arch == arch, arch
        assert len(model.categories) == 5, arch
        assert sum(p.numel() for p in model.parameters()) > 1_000_000, arch
