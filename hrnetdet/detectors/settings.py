"""A detector's build settings as one typed, frozen record per family: made (and checked) once,
taken by the builder, kept on the model as ``model.settings`` and written whole to config.json.
Changing one after the build goes through ``set_settings`` / ``temporary_settings``, which apply the
new record to the modules, so that the record and the modules never disagree.

This module imports no torch: the zoo's records and ``hrnetdet models`` read it."""
import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Bounds of what a setting may ask for, chosen so that a typo cannot allocate without limit: image
# sides in pixels, other counts.
MAX_SIDE = 10000
MAX_COUNT = 100000
SIDES = ("min_size", "max_size")
NULLABLE = ("mask_thresh",)  # None: the masks are left as probabilities
# config.json version: 1 (no "schema_version") held the build arguments that differed from the
# defaults, under the builders' names; 2 holds the whole record.
SCHEMA_VERSION = 2
# Earlier names of settings, still accepted from Python keywords and config.json.
ALIASES = {"box_score_thresh": "score_thresh", "box_nms_thresh": "nms_thresh",
           "box_detections_per_img": "detections_per_img"}


class SettingsError(ValueError):
    """A setting's value refused: ``field`` names it and ``problem`` says why."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem


def short_repr(value: Any) -> str:
    """A value for a one-line message."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def whole_problem(value: Any, low: int, high: int) -> Optional[str]:
    if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
        return None
    return f"must be a whole number from {low} to {high}, got {short_repr(value)}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _problem(key: str, value: Any, default: Any) -> Optional[str]:
    """What is wrong with ``value`` for the setting ``key`` whose default is ``default``, or None.
    Its type is the default's; sides are 1..MAX_SIDE pixels (the test scale of TTA may be
    fractional), thresholds 0..1, other counts up to MAX_COUNT (and down to 1, or to the default when
    that is lower: frozen_stages -1 freezes none)."""
    if isinstance(default, bool):
        return None if isinstance(value, bool) else f"must be true or false, got {short_repr(value)}"
    if isinstance(default, str):
        return None if isinstance(value, str) else f"must be a string such as {default!r}, got {short_repr(value)}"
    if isinstance(default, tuple):
        if not isinstance(value, tuple) or not value or (key not in SIDES and len(value) != len(default)):
            count = "one or more" if key in SIDES else len(default)
            return f"must be a list of {count} numbers such as {list(default)!r}, got {short_repr(value)}"
        return next(filter(None, (_problem(key, v, default[0]) for v in value)), None)
    if key in SIDES:
        if _is_number(value) and 1 <= value <= MAX_SIDE:
            return None
        return f"must be a number of pixels from 1 to {MAX_SIDE}, got {short_repr(value)}"
    if isinstance(default, int):
        return whole_problem(value, min(default, 1), MAX_COUNT)
    if not _is_number(value):
        return f"must be a number, got {short_repr(value)}"
    if key.endswith("_thresh") and not 0 <= value <= 1:
        return f"must be from 0 to 1, got {value}"
    if key == "image_std" and value <= 0:
        return f"must be above 0, got {value}"
    return None


def _normal(key: str, value: Any, default: Any) -> Any:
    """A value in the record's form: lists (JSON) and a single min_size become tuples, whole sides
    ints, and whole numbers of a fractional setting floats."""
    if key == "min_size" and isinstance(default, tuple) and _is_number(value):
        value = (value,)
    if isinstance(value, list):
        value = tuple(value)
    if isinstance(value, tuple) and isinstance(default, tuple):
        return tuple(_normal(key, v, default[0]) for v in value)
    if key in SIDES and _is_number(value) and float(value).is_integer():
        return int(value)
    if isinstance(default, float) and _is_number(value):
        return float(value)
    return value


@dataclass(frozen=True)
class DetectorSettings:
    """What every family shares: the backbone's training mode, the input transform and the
    detection test rule (score threshold, NMS IoU, detections kept per image)."""
    norm_eval: bool = True
    frozen_stages: int = -1
    min_size: Tuple[float, ...] = (800,)   # several: multi-scale training; the last is the test size
    max_size: float = 1333
    image_mean: Tuple[float, ...] = IMAGENET_MEAN
    image_std: Tuple[float, ...] = IMAGENET_STD
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100

    def __post_init__(self):
        """Every field normalised (JSON lists to tuples...) and checked: a bad one raises SettingsError naming it."""
        for f in dataclasses.fields(self):
            value = _normal(f.name, getattr(self, f.name), f.default)
            object.__setattr__(self, f.name, value)
            if value is None and f.name in NULLABLE:
                continue
            if value is None:
                raise SettingsError(f.name, f"may not be null (default {_json(f.default)!r})")
            problem = _problem(f.name, value, f.default)
            if problem:
                raise SettingsError(f.name, problem)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "DetectorSettings":
        """A record from keywords or a config.json's ``build_args`` (either layout): earlier names
        are accepted, unknown ones refused naming the setting."""
        return cls().replace(**values)

    def replace(self, **changes: Any) -> "DetectorSettings":
        """A copy with ``changes`` (checked as a new record is)."""
        known = {f.name for f in dataclasses.fields(self)}
        fields: Dict[str, Any] = {}
        given: Dict[str, str] = {}  # a setting -> the name it was given under (an earlier one)
        for key, value in changes.items():
            name = ALIASES.get(key, key)
            if name not in known:
                raise SettingsError(key, f"is not a setting of {type(self).__name__} "
                                          f"(known: {', '.join(sorted(known))})")
            fields[name], given[name] = value, key
        try:
            return dataclasses.replace(self, **fields)
        except SettingsError as e:
            raise SettingsError(given.get(e.field, e.field), e.problem) from None

    def to_dict(self) -> Dict[str, Any]:
        """The record as JSON values (tuples as lists), as config.json holds it."""
        return {f.name: _json(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _json(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True)
class FCOSSettings(DetectorSettings):
    """FCOS: also the candidates per level before NMS and the test rule's version (``"v2"``: the
    reference's v2.7, the published numbers; ``"v3"``: mmdet 3.3's)."""
    topk_candidates: int = 1000
    postprocess: str = "v2"


@dataclass(frozen=True)
class RCNNSettings(DetectorSettings):
    """Faster/Mask R-CNN: also the RPN's proposal counts, its NMS and sampling, the RoI sampling and
    the mask threshold."""
    mask_thresh: Optional[float] = 0.5
    rpn_pre_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_train: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    rpn_nms_thresh: float = 0.7
    rpn_batch_size_per_image: int = 256
    box_batch_size_per_image: int = 512


@dataclass(frozen=True)
class CascadeSettings(RCNNSettings):
    """Cascade (Mask) R-CNN: the reference's cascade RPN keeps 2000 proposals in training, and the
    mask stages' probabilities are combined by ``mask_ensemble`` (``"mean"`` or ``"last"``)."""
    rpn_post_nms_top_n_train: int = 2000
    mask_ensemble: str = "mean"


@dataclass(frozen=True)
class HTCSettings(CascadeSettings):
    """Hybrid Task Cascade: a lower score threshold (the reference's) and the semantic branch."""
    score_thresh: float = 0.001
    semantic: bool = True
    semantic_num_classes: int = 183


def given_settings(args: Any) -> Dict[str, Any]:
    """The settings a command's flags give (a flag's name is its setting's): those given, of the
    sizes a command sets when it builds its model."""
    return {name: getattr(args, name) for name in SIDES if getattr(args, name, None) is not None}


def make_settings(cls: type, settings: Optional[DetectorSettings], values: Dict[str, Any]) -> DetectorSettings:
    """A builder's record: ``settings`` (or ``cls``'s defaults) with the keyword ``values`` over it."""
    base = settings if settings is not None else cls()
    if not isinstance(base, cls):
        raise TypeError(f"settings must be a {cls.__name__}, got a {type(base).__name__}")
    return base.replace(**values) if values else base


def _score_heads(model: Any) -> list:
    """The modules with the detection test rule: the RoI heads (each cascade stage) or FCOS's head."""
    heads = getattr(model, "roi_heads", None)
    if heads is None:
        return [model.head]
    return list(heads.stages) if hasattr(heads, "stages") else [heads]


def _heads(attribute: str) -> Callable[[Any, Any], None]:
    def write(model: Any, value: Any) -> None:
        for head in _score_heads(model):
            setattr(head, attribute, value)
    return write


def _rpn_top_n(table: str, mode: str) -> Callable[[Any, Any], None]:
    def write(model: Any, value: Any) -> None:
        getattr(model.rpn, table)[mode] = value
    return write


def _sampler(model: Any, value: int) -> None:
    for head in _score_heads(model):
        head.fg_bg_sampler.batch_size_per_image = value


# What changes on a built model, and how: setting -> a function (model, value) that writes it into
# the modules. Settings missing here (the backbone's frozen stages, the semantic branch) shape the
# modules and are fixed when the model is built.
WRITERS: Dict[str, Callable[[Any, Any], None]] = {
    "norm_eval": lambda m, v: setattr(m.backbone.body, "norm_eval", v),
    "min_size": lambda m, v: setattr(m.transform, "min_size", tuple(v)),
    "max_size": lambda m, v: setattr(m.transform, "max_size", v),
    "image_mean": lambda m, v: setattr(m.transform, "image_mean", list(v)),
    "image_std": lambda m, v: setattr(m.transform, "image_std", list(v)),
    "mask_thresh": lambda m, v: setattr(m.transform, "mask_thresh", v),
    "score_thresh": _heads("score_thresh"),
    "nms_thresh": _heads("nms_thresh"),
    "detections_per_img": _heads("detections_per_img"),
    "topk_candidates": lambda m, v: setattr(m.head, "topk_candidates", v),
    "postprocess": lambda m, v: setattr(m.head, "postprocess", v),
    "rpn_pre_nms_top_n_train": _rpn_top_n("_pre_nms_top_n", "training"),
    "rpn_pre_nms_top_n_test": _rpn_top_n("_pre_nms_top_n", "testing"),
    "rpn_post_nms_top_n_train": _rpn_top_n("_post_nms_top_n", "training"),
    "rpn_post_nms_top_n_test": _rpn_top_n("_post_nms_top_n", "testing"),
    "rpn_nms_thresh": lambda m, v: setattr(m.rpn, "nms_thresh", v),
    "rpn_batch_size_per_image": lambda m, v: setattr(m.rpn.fg_bg_sampler, "batch_size_per_image", v),
    "box_batch_size_per_image": _sampler,
    "mask_ensemble": lambda m, v: setattr(m.roi_heads, "mask_ensemble", v),
}


def model_settings(model: Any) -> DetectorSettings:
    """The record a model was built with (and changed by ``set_settings`` since)."""
    settings = getattr(model, "settings", None)
    if not isinstance(settings, DetectorSettings):
        raise ValueError(f"{type(model).__name__} has no hrnetdet settings (model.settings): "
                         f"build it with hrnetdet.create_model")
    return settings


def set_settings(model: Any, **changes: Any) -> DetectorSettings:
    """Change settings of a built model: the new record (checked) is written into its modules and
    kept as ``model.settings``; returns the record it replaces."""
    old = model_settings(model)
    new = old.replace(**changes)
    changed = [f.name for f in dataclasses.fields(new) if getattr(new, f.name) != getattr(old, f.name)]
    fixed = [name for name in changed if name not in WRITERS]
    if fixed:
        raise ValueError(f"{', '.join(fixed)} shape(s) the modules and cannot change after the build: "
                         f"build a new model with it")
    for name in changed:
        WRITERS[name](model, getattr(new, name))
    model.settings = new
    return old


@contextlib.contextmanager
def temporary_settings(model: Any, **changes: Any) -> Iterator[DetectorSettings]:
    """``set_settings`` within the block; the previous settings are restored afterwards, also on
    errors. Keywords whose value is None are left unchanged."""
    changes = {k: v for k, v in changes.items() if v is not None}
    old = set_settings(model, **changes) if changes else model_settings(model)
    try:
        yield model.settings
    finally:
        if changes:
            set_settings(model, **old.to_dict())
