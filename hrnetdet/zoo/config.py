"""A saved model's config.json checked before anything is built from it: every field, and every
build argument against what the architecture's builder takes (the keys and types come from the
builders' signatures and a default model's settings, not from a list of their own)."""
import functools
import inspect
import math
import typing
from typing import Any, Callable, Dict, Optional, Tuple

from torch import nn

from ..data.categories import BACKGROUND
from ..detectors.rcnn import build_detector, build_rpn
from .checkpoint import _default_build_args, read_config
from .convert import CheckpointError
from .registry import get_family, split_name


# Bounds of what a config.json (or a builder keyword) may ask for, chosen so that a typo cannot
# allocate without limit: image sides in pixels, classes with the background, other counts.
MAX_SIDE = 10000
MAX_CLASSES = 100000
MAX_COUNT = 100000
SIDES = ("min_size", "max_size")


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
        if isinstance(value, tuple) or (key in SIDES and not isinstance(value, list)):  # (640, 672) or 800
            value = list(value) if isinstance(value, tuple) else [value]
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


def read_saved_config(config_path: str) -> Tuple[Dict[str, Any], str]:
    """A config.json that save_pretrained wrote (or a user edited), checked: the config and its architecture."""
    config = read_config(config_path)
    arch = config.get("architecture")
    if not isinstance(arch, str):
        raise CheckpointError(f"{config_path}: no 'architecture' (a config.json from hrnetdet's save_pretrained "
                              f"has one)")
    validate_config(config, config_path, split_name(arch)[0])
    return config, arch
