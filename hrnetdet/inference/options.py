"""Predict's options as one typed record, checked once when it is made, before any input is read:
the Python keywords of ``predict`` and ``run_predict`` and the flags of ``hrnetdet predict`` are its
field names (``score_thresh`` is ``--score-thresh``). A bad value is one ``OptionError`` naming the
field; a class name the model does not know is refused by ``label_ids`` before the first input."""
import dataclasses
import math
from typing import Any, Dict, Optional, Sequence, Tuple, Union

from ..data.images import MAX_PIXELS
from ..data.results import MASK_FORMATS

ClassName = Union[str, int]
SHAPES_RESULTS = {"shapes_results": True}  # a field whose value changes the detections a run records


class OptionError(ValueError):
    """A predict option that cannot run: ``field`` names it, ``rule`` says what it must be (and
    the value it got, unless ``value`` is ``...``: the rule says it all)."""

    def __init__(self, field: str, value: Any, rule: str):
        self.field, self.value, self.rule = field, value, rule
        super().__init__(f"{field} {rule}" + ("" if value is ... else f", got {value!r}"))

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")

    def cli_message(self) -> str:
        """The message as the CLI says it, argparse's way: ``argument --flag: must ..., got value``."""
        return f"argument {self.flag}: {self.rule}" + ("" if self.value is ... else f", got {self.value}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class PredictOptions:
    """How ``predict`` runs (see its docstring for each field). ``score_thresh`` None keeps the
    model's own threshold; ``max_pixels`` 0 lifts the pixel limit; ``classes`` keeps detections of
    these category names or label ids; ``max_det`` keeps the best that many per image;
    ``line_width`` and ``label_size`` (pixels) override the pictures' sizes, which otherwise follow
    each box within limits."""
    score_thresh: Optional[float] = dataclasses.field(default=None, metadata=SHAPES_RESULTS)
    batch_size: int = 1
    num_workers: Optional[int] = None
    half: bool = dataclasses.field(default=False, metadata=SHAPES_RESULTS)
    device: Optional[str] = None
    slice: Optional[int] = dataclasses.field(default=None, metadata=SHAPES_RESULTS)
    overlap: float = dataclasses.field(default=0.2, metadata=SHAPES_RESULTS)
    full_image: bool = dataclasses.field(default=True, metadata=SHAPES_RESULTS)
    tta: bool = dataclasses.field(default=False, metadata=SHAPES_RESULTS)
    mask_format: str = "uint8"
    max_pixels: int = MAX_PIXELS
    classes: Optional[Tuple[ClassName, ...]] = dataclasses.field(default=None, metadata=SHAPES_RESULTS)
    max_det: Optional[int] = dataclasses.field(default=None, metadata=SHAPES_RESULTS)
    line_width: Optional[int] = None
    label_size: Optional[int] = None

    def __post_init__(self) -> None:
        if isinstance(self.classes, (str, int)):  # one class given bare
            object.__setattr__(self, "classes", (self.classes,))
        elif self.classes is not None:
            object.__setattr__(self, "classes", tuple(self.classes))
        if self.device is not None:
            object.__setattr__(self, "device", str(self.device))
        for check in (self._check_numbers, self._check_choices, self._check_classes):
            check()

    def _check_numbers(self) -> None:
        if self.score_thresh is not None and not (_is_number(self.score_thresh) and 0 <= self.score_thresh <= 1):
            raise OptionError("score_thresh", self.score_thresh, "must be a score in [0, 1]")
        if not (_is_number(self.overlap) and 0 <= self.overlap < 1):
            raise OptionError("overlap", self.overlap, "must be a fraction of the tile in [0, 1)")
        for name, least in (("batch_size", 1), ("num_workers", 0), ("slice", 1), ("max_pixels", 0),
                            ("max_det", 1), ("line_width", 1), ("label_size", 1)):
            value = getattr(self, name)
            if (value is not None or name in ("batch_size", "max_pixels")) and not (_is_int(value) and value >= least):
                raise OptionError(name, value, f"must be a whole number of at least {least}")

    def _check_choices(self) -> None:
        if self.mask_format not in MASK_FORMATS:
            raise OptionError("mask_format", self.mask_format, f"must be one of {', '.join(MASK_FORMATS)}")
        for name in ("half", "full_image", "tta"):
            if not isinstance(getattr(self, name), bool):
                raise OptionError(name, getattr(self, name), "must be True or False")
        if self.slice is not None and self.tta:
            raise OptionError("tta", ..., "does not combine with slice: choose sliced inference or "
                                          "test-time augmentation")

    def _check_classes(self) -> None:
        if self.classes is None:
            return
        if not self.classes:
            raise OptionError("classes", list(self.classes), "must name at least one class")
        for c in self.classes:
            if not (isinstance(c, str) and c) and not (_is_int(c) and c >= 0):
                raise OptionError("classes", c, "must be category names or label ids (whole numbers)")

    @property
    def pixel_limit(self) -> Optional[int]:
        """The decoder's pixel limit: None when ``max_pixels`` is 0 (no limit)."""
        return self.max_pixels or None

    @property
    def mode(self) -> Dict[str, Any]:
        """The fields that choose how the model runs (plain, sliced, TTA), as ``modes.detect`` takes them."""
        return {"slice": self.slice, "overlap": self.overlap, "full_image": self.full_image, "tta": self.tta,
                "mask_format": self.mask_format}

    def replace(self, **changes: Any) -> "PredictOptions":
        """A copy with ``changes``, checked as a new record is."""
        return dataclasses.replace(self, **changes)

    def label_ids(self, categories: Sequence[str]) -> Optional[Tuple[int, ...]]:
        """The label ids ``classes`` names, for a model with these ``categories`` (label 0 the
        background); None keeps every class. An unknown name or id is an OptionError listing
        what the model knows."""
        if self.classes is None:
            return None
        known = {name: i for i, name in enumerate(categories) if i > 0}
        ids = []
        for c in self.classes:
            if isinstance(c, str) and c.isdigit():
                c = int(c)  # from the CLI: "--classes 1 person"
            if isinstance(c, str) and c not in known:
                shown = ", ".join(list(known)[:10]) + (", ..." if len(known) > 10 else "")
                raise OptionError("classes", c, f"must be classes of the model ({shown or 'none named'})")
            if isinstance(c, int) and (c < 1 or (categories and c >= len(categories))):
                raise OptionError("classes", c, f"must be label ids from 1 to {len(categories) - 1}")
            ids.append(known[c] if isinstance(c, str) else c)
        return tuple(ids)

    def fingerprint(self) -> Dict[str, Any]:
        """The fields that shape a run's results, by their CLI flags (a predict run's ``run.json``)."""
        return {"--" + f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)
                if f.metadata.get("shapes_results")}


def options_of(options: Optional[PredictOptions] = None, **fields: Any) -> PredictOptions:
    """``options`` (or the defaults) with ``fields`` changed: the record ``predict`` and ``run_predict`` run with."""
    if options is not None and not isinstance(options, PredictOptions):
        raise TypeError(f"options must be a PredictOptions record, got {type(options).__name__} (give the "
                        f"fields as keywords: score_thresh=...)")
    base = options if options is not None else PredictOptions()
    return base.replace(**fields) if fields else base
