"""A saved model's config.json checked before anything is built from it: every field, and its
``build_args`` through the family's settings record (``detectors/settings.py``), which checks each
setting's type and range."""
from typing import Any, Dict, Tuple

from ..data.categories import BACKGROUND
from ..detectors.settings import SCHEMA_VERSION, DetectorSettings, SettingsError, short_repr, whole_problem
from .checkpoint import read_config
from .convert import CheckpointError
from .registry import get_family, split_name

MAX_CLASSES = 100000


def validate_config(config: Dict[str, Any], path: str, arch: str) -> DetectorSettings:
    """A saved config (config.json) checked before anything is built from it: ``schema_version``,
    ``num_classes``, ``categories`` (they must fit ``num_classes``), ``category_ids`` and
    ``build_args``, made into ``arch``'s settings record. Either layout: the whole record (schema 2)
    or, without a schema version, the settings that differed from the defaults under the builders'
    earlier names. Returns the record; raises CheckpointError naming the file and the field."""
    def refuse(field: str, problem: str) -> None:
        raise CheckpointError(f"{path}: {field} {problem}")

    version = config.get("schema_version", 1)
    problem = whole_problem(version, 1, SCHEMA_VERSION)
    if problem:
        refuse("schema_version", f"{problem} (this hrnetdet reads up to {SCHEMA_VERSION}: a newer one wrote it?)")

    num_classes = config.get("num_classes")
    problem = None if num_classes is None else whole_problem(num_classes, 2, MAX_CLASSES)
    if problem:
        refuse("num_classes", f"{problem} (classes with the background)")
    categories = config.get("categories")
    if categories is not None:
        if not isinstance(categories, list) or not categories or not all(isinstance(c, str) for c in categories):
            refuse("categories", f"must be a list of names, got {short_repr(categories)}")
        with_background = len(categories) + (categories[0] != BACKGROUND)
        if num_classes is not None and with_background != num_classes:
            refuse("categories", f"holds {len(categories)} names, which do not fit num_classes={num_classes} "
                                 f"(which counts the background {BACKGROUND!r})")
        ids = config.get("category_ids")
        if ids is not None and (not isinstance(ids, list) or len(ids) not in (with_background - 1, with_background)
                                or not all(i is None or whole_problem(i, 0, 2 ** 63 - 1) is None for i in ids)):
            refuse("category_ids", f"must be a list of {with_background - 1} whole numbers (one per category), "
                                   f"got {short_repr(ids)}")
    build_args = config.get("build_args", {})
    if not isinstance(build_args, dict):
        refuse("build_args", f"must be an object of builder settings, got {short_repr(build_args)}")
    try:
        return get_family(arch)[0].make_settings(build_args)
    except SettingsError as e:
        refuse(f"build_args.{e.field}", e.problem)


def read_saved_config(config_path: str) -> Tuple[Dict[str, Any], str]:
    """A config.json that save_pretrained wrote (or a user edited), checked: the config and its architecture."""
    config = read_config(config_path)
    arch = config.get("architecture")
    if not isinstance(arch, str):
        raise CheckpointError(f"{config_path}: no 'architecture' (a config.json from hrnetdet's save_pretrained "
                              f"has one)")
    validate_config(config, config_path, split_name(arch)[0])
    return config, arch
