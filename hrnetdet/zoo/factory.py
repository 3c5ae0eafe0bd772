"""``create_model`` and the generated per-architecture factories (timm's ``_builder`` role)."""
import logging
import os
from typing import Any, Callable, Dict, Optional, Sequence, Union

from torch import nn

from ..data.categories import BACKGROUND, COCO_CATEGORIES, categories_for, category_ids_for
from ..names import HF_HUB_PREFIX, saved_model_folder
from .checkpoint import CONFIG_FILE, WEIGHTS_FILE, Checkpoint, load_into, read_checkpoint
from .config import read_saved_config, validate_config
from .convert import CheckpointError
from .hub import (hub_model_files, load_backbone_weights, load_except_class_layers,
                  load_pretrained_checkpoint)
from .records import PretrainedCfg, arch_name
from .registry import (get_arch_pretrained_cfgs, get_family, get_pretrained_cfg, list_models,
                       split_name)

logger = logging.getLogger("hrnetdet")


def create_model(name: str, pretrained: Union[bool, str] = False, *, num_classes: Optional[int] = None,
                 checkpoint_path: Optional[str] = None, categories: Optional[Sequence[str]] = None,
                 category_ids: Optional[Sequence[int]] = None, weights_backbone: Union[bool, str, None] = None,
                 local_files_only: bool = False, **kwargs: Any) -> nn.Module:
    """Build a detector by name, optionally with weights.

    Args:
        name: an architecture from ``list_models()``, optionally with a weight tag
            (``"mask_rcnn_hrnetv2p_w18.coco_2x"``); a folder written by ``save_pretrained`` (a
            training run's ``best/``), rebuilt with its weights and settings; or
            ``"hf-hub:org/name[@revision]"``, such a folder on the Hugging Face Hub.
        pretrained: ``True`` loads the tag's (or the default) published weights, or the Hub
            repository's; a string names a tag.
        num_classes: classes including the background (COCO: 81). With pretrained weights and a
            different value, everything but the class-dependent layers is loaded.
        checkpoint_path: a reference (mmdetection) ``.pth`` or an hrnetdet ``.safetensors`` file;
            the build arguments, categories and ids of a config.json beside it apply.
        categories: category names (background first, or it is added).
        category_ids: the dataset's id of each category (without the background), kept as
            ``model.category_ids`` (aligned with ``model.categories``, None for the background).
        weights_backbone: without detector weights, initialise the HRNet from timm's ImageNet
            weights on the Hub: ``True`` (``hrnet_w{width}.ms_in1k``) or a timm name. Never fetched
            when detector weights are loaded.
        local_files_only: use cached files only (as ``HF_HUB_OFFLINE=1`` does).
        **kwargs: settings of the family's record (``min_size``, ``score_thresh``, ...; see
            ``hrnetdet.detectors.settings``), over a saved config's; the model keeps the record as
            ``model.settings``.
    """
    config: Dict[str, Any] = {}
    config_path = None
    if name.startswith(HF_HUB_PREFIX):
        repo_id, _, revision = name[len(HF_HUB_PREFIX):].partition("@")
        config_path, weights_path = hub_model_files(repo_id, revision or None, weights=bool(pretrained),
                                                    local_files_only=local_files_only)
        (config, name), pretrained = read_saved_config(config_path), False
        checkpoint_path = checkpoint_path or weights_path
    elif os.path.isdir(name):
        folder = saved_model_folder(name)
        if folder != name:
            logger.info("%s is a training run: using its %s/", name, os.path.basename(folder))
        config_path = os.path.join(folder, CONFIG_FILE)
        checkpoint_path = checkpoint_path or os.path.join(folder, WEIGHTS_FILE)
        name, pretrained = read_saved_config(config_path)[1], False
    arch, tag = split_name(name)
    if isinstance(pretrained, str):
        if tag is not None and tag != pretrained:
            raise ValueError(f"tag {tag!r} in the name and pretrained={pretrained!r} disagree")
        tag, pretrained = pretrained, True
    family, width = get_family(arch)
    cfg: Optional[PretrainedCfg] = get_pretrained_cfg(f"{arch}.{tag}" if tag else arch)
    if pretrained and cfg is None:
        raise ValueError(f"{arch} has no published weights; hrnetdet.list_models(pretrained=True) lists those that do")

    ckpt: Optional[Checkpoint] = None
    if checkpoint_path is not None:
        ckpt = read_checkpoint(checkpoint_path)
        if ckpt.family is not None and (ckpt.family, ckpt.width) != (family.name, width):
            raise CheckpointError(
                f"{checkpoint_path} holds a {arch_name(ckpt.family, ckpt.width)} checkpoint, not {arch}")
        if ckpt.config:
            config, config_path = ckpt.config, _config_source(checkpoint_path)
    elif pretrained:
        ckpt = load_pretrained_checkpoint(cfg, local_files_only=local_files_only)

    settings = validate_config(config, config_path, arch) if config else family.make_settings()
    settings = settings.replace(**kwargs)
    ckpt_classes = (ckpt.num_classes or (len(ckpt.categories) if ckpt.categories else None)) if ckpt else None
    if num_classes is None:
        num_classes = ckpt_classes or config.get("num_classes") or len(COCO_CATEGORIES)
    if categories is not None:
        names = list(categories)
        if len(names) + (names[0] != BACKGROUND) != num_classes:
            raise ValueError(f"{len(names)} categories for num_classes={num_classes} (which counts the background)")
    else:
        categories = ckpt.categories if ckpt is not None else config.get("categories")
    categories = categories_for(num_classes, categories)
    if category_ids is None and config.get("categories") == categories:
        category_ids = config.get("category_ids")
    model = family.build(width, num_classes=num_classes, categories=categories, settings=settings)
    if ckpt is not None:
        source = checkpoint_path or cfg.name
        if ckpt_classes is not None and ckpt_classes != num_classes:
            load_except_class_layers(model, ckpt.state_dict, source, arch)
        else:
            load_into(model, ckpt.state_dict, source, arch)
        if weights_backbone:
            logger.info("weights_backbone=%r not fetched: %s has the whole detector's weights",
                        weights_backbone, source)
    elif weights_backbone:
        load_backbone_weights(model, weights_backbone, width, local_files_only=local_files_only)
    model.category_ids = category_ids_for(categories, category_ids)
    model.pretrained_cfg = cfg
    model.arch = arch
    return model


def _config_source(checkpoint_path: str) -> str:
    """The file a safetensors checkpoint's config came from: the config.json beside it, else its header."""
    beside = os.path.join(os.path.dirname(os.path.abspath(checkpoint_path)), CONFIG_FILE)
    return beside if os.path.isfile(beside) else checkpoint_path


def _factory(arch: str) -> Callable[..., nn.Module]:
    family, width = get_family(arch)
    cfg = get_pretrained_cfg(arch)

    def factory(pretrained: Union[bool, str] = False, *, num_classes: Optional[int] = None,
                checkpoint_path: Optional[str] = None, **kwargs: Any) -> nn.Module:
        return create_model(arch, pretrained, num_classes=num_classes, checkpoint_path=checkpoint_path, **kwargs)

    tags = ", ".join(c.tag for c in get_arch_pretrained_cfgs(arch)) or "none published"
    metrics = ""
    if cfg is not None:
        metrics = (f" Default weights ``{cfg.tag}``: {cfg.metrics.get('box_ap')} box AP"
                   + (f", {cfg.metrics['mask_ap']} mask AP" if "mask_ap" in cfg.metrics else "")
                   + " on COCO val2017 (the reference's figures).")
    factory.__name__ = factory.__qualname__ = arch
    factory.__doc__ = (
        f"{family.title} on HRNetV2p-W{width} (HRNet + HRFPN), in torchvision's detection contract.\n\n"
        f"Weight tags: {tags}.{metrics}\n\n"
        "Args:\n"
        "    pretrained: True for the default weights, or a weight tag.\n"
        "    num_classes: classes including the background; pretrained weights then keep all but the\n"
        "        class-dependent layers.\n"
        "    checkpoint_path: a reference (mmdetection) .pth or hrnetdet .safetensors file.\n"
        "    weights_backbone: without detector weights, True or a timm name (hrnet_w32.ms_in1k) loads\n"
        "        ImageNet HRNet weights into the backbone.\n"
        "    **kwargs: settings (min_size, max_size, score_thresh, norm_eval, ...).\n"
    )
    return factory


def build_factories() -> Dict[str, Callable[..., nn.Module]]:
    return {arch: _factory(arch) for arch in list_models()}
