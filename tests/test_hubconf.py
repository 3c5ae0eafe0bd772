"""torch.hub (source="local") lists, documents and builds every family from the registry."""
import importlib.util
from pathlib import Path

import torch

import hrnetdet
from hrnetdet.detectors import has_masks
from hrnetdet.zoo.records import arch_name
from hrnetdet.zoo.registry import get_arch_pretrained_cfgs, get_pretrained_cfg

REPO = str(Path(__file__).resolve().parents[1])


def test_hubconf_lists_every_architecture_with_its_weights():
    """hubconf's entry points are the registry's architectures, and each entry's help (what
    torch.hub.help shows) names its weight tags and its default weights' box AP from the registry."""
    spec = importlib.util.spec_from_file_location("hubconf", Path(REPO) / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    entries = sorted(n for n in vars(hubconf) if callable(getattr(hubconf, n)) and not n.startswith("_"))
    assert entries == sorted(hrnetdet.list_models())
    for arch in ("faster_rcnn_hrnetv2p_w32", "htc_hrnetv2p_w18", "fcos_hrnetv2p_w48"):
        doc = getattr(hubconf, arch).__doc__
        tags = [c.tag for c in get_arch_pretrained_cfgs(arch)]
        assert f"Weight tags: {', '.join(tags) or 'none published'}." in doc, arch
        default = get_pretrained_cfg(arch)
        if default is not None:
            assert f"Default weights ``{default.tag}``: {default.metrics['box_ap']} box AP" in doc, arch
    assert "Weight tags: coco_1x, coco_2x." in hubconf.faster_rcnn_hrnetv2p_w32.__doc__
    assert {"torch", "torchvision", "huggingface_hub", "safetensors"} <= set(hubconf.dependencies)


def test_hub_load_builds_every_family():
    """Iterates over the registry, so families added later are covered too (smallest width each)."""
    for family in hrnetdet.list_families():
        arch = arch_name(family.name, min(family.widths))
        model = torch.hub.load(REPO, arch, source="local", pretrained=False, num_classes=5)
        assert isinstance(model, torch.nn.Module) and model.arch == arch, arch
        assert len(model.categories) == 5, arch
        assert has_masks(model) == family.has_masks, arch  # the family's one mask flag builds what it says
        assert sum(p.numel() for p in model.parameters()) > 1_000_000, arch
