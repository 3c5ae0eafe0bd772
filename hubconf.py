"""torch.hub entry points: one per hrnetdet architecture, with the factory's docstring, e.g.

    torch.hub.load("path/to/hrnetdet", "faster_rcnn_hrnetv2p_w32", source="local", pretrained=True)

or, from GitHub, the repository's ``owner/name:tag`` in place of the path (without ``source``).

Derived from the registry (timm's hubconf: the factories are the entry points).
"""
dependencies = ["torch", "torchvision", "huggingface_hub", "safetensors", "timm"]

import torchvision  # noqa: E402

if tuple(int(p) for p in torchvision.__version__.split(".")[:2]) < (0, 16):
    raise ImportError(f"hrnetdet needs torchvision >= 0.16, found {torchvision.__version__}")

import hrnetdet  # noqa: E402

globals().update({name: getattr(hrnetdet, name) for name in hrnetdet.list_models()})
