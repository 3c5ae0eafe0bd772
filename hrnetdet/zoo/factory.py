"""``create_model`` and the generated per-architecture factories (timm's ``_builder`` role)."""
import functools
import inspect
import logging
import math
import os
import typing
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

from torch import nn

from ..detectors.rcnn import build_detector, build_rpn
from .checkpoint import (CONFIG_FILE, WEIGHTS_FILE, Checkpoint, _default_build_args, load_into, read_checkpoint,
                         read_config)
from .coco import BACKGROUND, COCO_CATEGORIES
from .convert import CheckpointError, categories_for, category_ids_for
from .hub import (HF_HUB_PREFIX, hub_model_files, load_backbone_weights, load_except_class_layers,
                  load_pretrained_checkpoint)
from .records import PretrainedCfg, arch_name
from .registry import get_arch_pretrained_cfgs, get_family, get_pretrained_cfg, list_models, split_name

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
        **kwargs: passed to the family's builder (``min_size``, ``box_score_thresh``, ...); they
            override a saved config's.
    """
    config: Dict[str, Any] = {}
    config_path = None
    if name.startswith(HF_HUB_PREFIX):
        repo_id, _, revision = name[len(HF_HUB_PREFIX):].partition("@")
        config_path, weights_path = hub_model_files(repo_id, revision or None, weights=bool(pretrained),
                                                    local_files_only=local_files_only)
        config, pretrained = read_config(config_path), False
        name = _saved_arch(config, config_path)
        checkpoint_path = checkpoint_path or weights_path
    elif os.path.isdir(name):
        config_path = os.path.join(name, CONFIG_FILE)
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{name} is a folder without {CONFIG_FILE}: not one save_pretrained wrote")
        checkpoint_path = checkpoint_path or os.path.join(name, WEIGHTS_FILE)
        name = _saved_arch(read_config(config_path), config_path)
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

    if config:
        validate_config(config, config_path, arch)
    check_build_kwargs(kwargs, arch)
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
    model = family.build(width, num_classes=num_classes, categories=categories,
                         **{**config.get("build_args", {}), **kwargs})
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


def _saved_arch(config: Dict[str, Any], config_path: str) -> str:
    arch = config.get("architecture")
    if not isinstance(arch, str):
        raise CheckpointError(f"{config_path}: no 'architecture' (a config.json from hrnetdet's save_pretrained has one)")
    return arch


# Bounds of what a config.json (or a builder keyword) may ask for, chosen so that a typo cannot
# allocate without limit: image sides in pixels, classes with the background, other counts.
MAX_SIDE = 10000
MAX_CLASSES = 100000
MAX_COUNT = 100000
SIDES = ("min_size", "max_size")


def _config_source(checkpoint_path: str) -> str:
    """The file a safetensors checkpoint's config came from: the config.json beside it, else its header."""
    beside = os.path.join(os.path.dirname(os.path.abspath(checkpoint_path)), CONFIG_FILE)
    return beside if os.path.isfile(beside) else checkpoint_path


def _keywords(builder: Callable[..., nn.Module]) -> Dict[str, inspect.Parameter]:
    """The keyword parameters of a family's builder; a builder with ``**kwargs`` hands them on to
    the two-stage assembly (``build_detector``, then ``build_rpn``), whose keywords count too."""
    params = dict(inspect.signature(builder).parameters)
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        for assembly in (build_detector, build_rpn):
            params = {**inspect.signature(assembly).parameters, **params}
    return {n: p for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


@functools.lru_cache(maxsize=None)
def build_settings(arch: str) -> Dict[str, Tuple[Any, bool]]:
    """The build arguments of ``arch`` a config.json may set: setting -> (its default, whether it may
    be null). The keywords ``arch``'s builder takes that a built model records (what save_pretrained
    writes), with the defaults read back from a model built on the meta device."""
    family, _ = get_family(arch)
    params = _keywords(family.builder)
    return {key: (default, params[key].default is None or type(None) in typing.get_args(params[key].annotation))
            for key, default in _default_build_args(arch).items() if key in params}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _whole(value: Any, low: int, high: int) -> Optional[str]:
    """What is wrong with ``value`` as a whole number in [low, high], or None."""
    if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
        return None
    return f"must be a whole number from {low} to {high}, got {_short(value)}"


def _setting_problem(key: str, value: Any, default: Any, nullable: bool) -> Optional[str]:
    """What is wrong with ``value`` for the build setting ``key`` (whose default is ``default``), or None.
    Its type is the default's; sides are 1..MAX_SIDE pixels, thresholds 0..1, other counts up to
    MAX_COUNT (and down to 1, or to the default when that is lower: frozen_stages -1 freezes none)."""
    if value is None:
        return None if nullable else f"may not be null (default {default!r})"
    if isinstance(default, bool):
        return None if isinstance(value, bool) else f"must be true or false, got {_short(value)}"
    if isinstance(default, str):
        return None if isinstance(value, str) else f"must be a string such as {default!r}, got {_short(value)}"
    if isinstance(default, list):
        value = list(value) if isinstance(value, tuple) else [value] if key in SIDES and not isinstance(value, list) else value
        if not isinstance(value, list) or not value or (key not in SIDES and len(value) != len(default)):
            count = "one or more" if key in SIDES else len(default)
            return f"must be a list of {count} numbers such as {default!r}, got {_short(value)}"
        return next(filter(None, (_setting_problem(key, v, default[0], False) for v in value)), None)
    if key in SIDES:
        return _whole(value, 1, MAX_SIDE)
    if isinstance(default, int):
        return _whole(value, min(default, 1), MAX_COUNT)
    if not _is_number(value):
        return f"must be a number, got {_short(value)}"
    if key.endswith("_thresh") and not 0 <= value <= 1:
        return f"must be from 0 to 1, got {value}"
    if key == "image_std" and value <= 0:
        return f"must be above 0, got {value}"
    return None


def check_build_kwargs(kwargs: Dict[str, Any], arch: str) -> None:
    """Builder keywords given in Python (or by the CLI's flags) that a config.json could also hold,
    checked as a config.json's are (other keywords are left to the builder)."""
    settings = build_settings(arch)
    for key, value in kwargs.items():
        problem = _setting_problem(key, value, *settings[key]) if key in settings else None
        if problem:
            raise ValueError(f"{key}={_short(value)}: {problem}")


def validate_config(config: Dict[str, Any], path: str, arch: str) -> None:
    """A saved config (config.json) checked before anything is built from it: ``num_classes``,
    ``categories`` (they must fit ``num_classes``), ``category_ids`` and every key and value of
    ``build_args`` against what ``arch``'s builder takes. Raises CheckpointError naming the file and
    the field."""
    def refuse(field: str, problem: str) -> None:
        raise CheckpointError(f"{path}: {field} {problem}")

    num_classes = config.get("num_classes")
    problem = None if num_classes is None else _whole(num_classes, 2, MAX_CLASSES)
    if problem:
        refuse("num_classes", f"{problem} (classes with the background)")
    categories = config.get("categories")
    if categories is not None:
        if not isinstance(categories, list) or not categories or not all(isinstance(c, str) for c in categories):
            refuse("categories", f"must be a list of names, got {_short(categories)}")
        with_background = len(categories) + (categories[0] != BACKGROUND)
        if num_classes is not None and with_background != num_classes:
            refuse("categories", f"holds {len(categories)} names, which do not fit num_classes={num_classes} "
                                 f"(which counts the background {BACKGROUND!r})")
        ids = config.get("category_ids")
        if ids is not None and (not isinstance(ids, list) or len(ids) not in (with_background - 1, with_background)
                                or not all(i is None or _whole(i, 0, 2 ** 63 - 1) is None for i in ids)):
            refuse("category_ids", f"must be a list of {with_background - 1} whole numbers (one per category), "
                                   f"got {_short(ids)}")
    build_args = config.get("build_args", {})
    if not isinstance(build_args, dict):
        refuse("build_args", f"must be an object of builder settings, got {_short(build_args)}")
    settings = build_settings(arch)
    for key, value in build_args.items():
        if key not in settings:
            refuse(f"build_args.{key}", f"is not a setting of {arch} (known: {', '.join(sorted(settings))})")
        problem = _setting_problem(key, value, *settings[key])
        if problem:
            refuse(f"build_args.{key}", problem)


def _short(value: Any) -> str:
    """A JSON value for a one-line message."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


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
        "    **kwargs: builder options (min_size, max_size, box_score_thresh, norm_eval, ...).\n"
    )
    return factory


def build_factories() -> Dict[str, Callable[..., nn.Module]]:
    return {arch: _factory(arch) for arch in list_models()}
