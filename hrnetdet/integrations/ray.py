"""Batch inference with Ray Data: ``Predictor``, a callable class for ``Dataset.map_batches`` on an
actor pool, and ``predict_dataset(ds, model, ...)``, which maps a dataset through it.

Each actor builds its model once (from any spec ``hrnetdet predict`` takes: an architecture with
``pretrained`` or ``checkpoint_path``, a saved or training-run folder, an ``hf-hub:`` name) and
runs torch on no more threads than the CPUs Ray gave it. Ray Data restarts an actor that dies and
runs the batches it held again (its actor pools' defaults: ``max_restarts`` and
``max_task_retries`` -1), so a lost actor or machine costs time, not rows: every row comes out once.

Columns in: a row's image is read from the first of these columns the dataset has:

- ``bytes``: encoded image files (``ray.data.read_binary_files``; with ``include_paths=True`` its
  ``path`` column names the row in errors);
- ``image``: HWC uint8 RGB arrays (``ray.data.read_images(..., mode="RGB")``);
- ``path``: image files or http(s) URLs, read where the actor runs.

Files and bytes go through hrnetdet's own reader (``hrnetdet.data.images``: upright, RGB, the
pixel limit). The other columns pass through (ids, ``path``); the ``bytes`` and ``image`` columns
are dropped. Columns out, one value per row: ``boxes`` (a list of [x1, y1, x2, y2]), ``labels``,
``category_ids`` (the dataset's ids, as results.json carries them), ``scores``, ``names``,
``masks`` (mask models only: COCO RLE dicts with ``counts`` as text), ``height``, ``width`` and
``error``: None, or why the row's image could not be read (that row has no detections; the
batch goes on).

Needs ``pip install 'hrnetdet[ray]'``."""
import os
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

try:
    import pyarrow as pa
    import ray
except ImportError as e:  # the optional extra
    raise ImportError("hrnetdet.integrations.ray needs Ray Data: pip install 'hrnetdet[ray]'") from e

from ..data.images import decode_image_bytes
from ..data.results import category_ids_of
from ..detectors.settings import given_settings
from ..detectors.transform import MIN_IMAGE_SIDE
from ..inference.commands import int8_kwargs
from ..inference.loading import load_model
from ..inference.options import PredictOptions, options_of
from ..inference.predict import iter_predictions
from ..inference.predict_run import LocalEngine
from ..inference.sources import is_url, is_video
from ..inference.thresholds import set_score_threshold
from ..names import names_weights
from ..threads import default_num_threads, set_num_threads

IMAGE_COLUMNS = ("bytes", "image", "path")  # where a row's image is read from, first found first
PIXEL_COLUMNS = ("bytes", "image")  # dropped from the output: the detections replace them

RLE = pa.struct([("size", pa.list_(pa.int64())), ("counts", pa.string())])
COLUMN_TYPES = {"boxes": pa.list_(pa.list_(pa.float32(), 4)), "labels": pa.list_(pa.int64()),
                "category_ids": pa.list_(pa.int64()), "scores": pa.list_(pa.float32()),
                "names": pa.list_(pa.string()), "masks": pa.list_(RLE),
                "height": pa.int32(), "width": pa.int32(), "error": pa.string()}


def actor_threads() -> int:
    """torch threads for this actor: the CPUs Ray reserved for it (at least one), never more than
    the machine's free physical cores (``threads.default_num_threads``)."""
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1) if ray.is_initialized() else 1
    return max(1, min(int(cpus), default_num_threads()))


def video_refusal(path: str) -> str:
    """Why a video is an error row: a row is one image (a video's frames can be rows of arrays)."""
    return f"{path!r} is a video: hrnetdet's Ray predictor takes images"


def image_column(batch: Dict[str, Any]) -> str:
    """The column a batch's images are read from (see the module's docstring)."""
    for name in IMAGE_COLUMNS:
        if name in batch:
            return name
    raise ValueError(f"a batch for hrnetdet's Predictor needs an image column ({', '.join(IMAGE_COLUMNS)}); "
                     f"it has {', '.join(batch) or 'none'}")


class Predictor:
    """``ds.map_batches(Predictor, fn_constructor_args=(model,), fn_constructor_kwargs={...},
    compute=ray.data.ActorPoolStrategy(size=N), num_cpus=1)``: detections of each row's image (the module's
    docstring lists the columns). ``model``, ``pretrained``, ``checkpoint_path``, ``backend``,
    ``fast``, ``int8`` and ``settings`` (the model's: ``{"min_size": 800}``) build the model as
    ``hrnetdet.inference.loading.load_model``; ``options`` (a ``PredictOptions``) and ``fields``
    (its fields as keywords) run it as ``hrnetdet.predict`` does. Masks are always RLE; images are decoded in the actor
    (``num_workers`` 0 unless given: Ray runs the actors in parallel). ``threads``: torch threads
    (default ``actor_threads()``)."""

    def __init__(self, model: str, *, pretrained: Any = False, checkpoint_path: Optional[str] = None,
                 backend: str = "torch", fast: bool = False, int8: Optional[Dict[str, Any]] = None,
                 settings: Optional[Dict[str, Any]] = None, options: Optional[PredictOptions] = None,
                 threads: Optional[int] = None, **fields: Any):
        options = options_of(options, **fields)
        self.options = options.replace(mask_format="rle", num_workers=options.num_workers or 0)
        self.threads = set_num_threads(threads or actor_threads())
        self.model = load_model(model, pretrained=pretrained, checkpoint_path=checkpoint_path, backend=backend,
                                fast=fast, int8=int8, **(settings or {}))
        if self.options.device is not None:
            self.model.to(torch.device(self.options.device))
        if self.options.score_thresh is not None:
            set_score_threshold(self.model, self.options.score_thresh)  # this actor's model, for good
        self.options.label_ids(list(getattr(self.model, "categories", [])))  # an unknown class: refused now
        self.category_ids = category_ids_of(self.model)
        self.has_masks = any(getattr(m, "mask_predictor", None) is not None for m in self.model.modules())

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        column = image_column(batch)
        items, errors = self._items(batch, column)
        rows: List[Dict[str, Any]] = [{"error": error} for error in errors]
        for res in self.results(items, [i for i, error in enumerate(errors) if error is None]):
            rows[res["input_index"]] = res
        out = {name: values for name, values in batch.items() if name not in PIXEL_COLUMNS}
        out.update(self.columns(rows))
        return out

    def results(self, items: Sequence[Any], indices: List[int]) -> Iterator[Dict[str, Any]]:
        """``iter_predictions``' results of the rows ``indices`` (an error record for an unreadable one)."""
        with torch.no_grad():
            yield from iter_predictions(self.model, [items[i] for i in indices], self.options, indices=indices,
                                        with_images=True)

    def _items(self, batch: Dict[str, Any], column: str) -> Tuple[List[Any], List[Optional[str]]]:
        """Each row's input for ``iter_predictions`` (a path, an array, a decoded tensor), and
        its error (None: readable so far)."""
        names = batch.get("path")
        items: List[Any] = []
        errors: List[Optional[str]] = []
        for i, value in enumerate(batch[column]):
            name = str(names[i]) if names is not None and names[i] is not None else f"row {i} of the batch"
            item, error = self._item(column, value, name)
            items.append(item)
            errors.append(error)
        return items, errors

    def _item(self, column: str, value: Any, name: str) -> Tuple[Any, Optional[str]]:
        if value is None:
            return None, f"{name}: no {column}"
        if column == "path":
            return (None, video_refusal(str(value))) if is_video(str(value)) else (str(value), None)
        if column == "image":
            return np.asarray(value), None
        try:
            return decode_image_bytes(bytes(value), name, max_pixels=self.options.pixel_limit,
                                      min_side=MIN_IMAGE_SIDE), None
        except ValueError as e:
            return None, str(e)

    def columns(self, rows: List[Dict[str, Any]]) -> Dict[str, Any]:
        """The result columns of ``rows`` (results, or ``{"error": ...}``) as typed Arrow arrays:
        the same schema for every batch, whatever it holds."""
        values: Dict[str, List[Any]] = {name: [] for name in COLUMN_TYPES if name != "masks" or self.has_masks}
        for row in rows:
            for name, value in self._row(row).items():
                if name in values:
                    values[name].append(value)
        return {name: pa.array(column, type=COLUMN_TYPES[name]) for name, column in values.items()}

    def _row(self, res: Dict[str, Any]) -> Dict[str, Any]:
        if "error" in res:
            return {"boxes": [], "labels": [], "category_ids": [], "scores": [], "names": [], "masks": [],
                    "height": None, "width": None, "error": res["error"]}
        image: Tensor = res["image"]
        labels = res["labels"].tolist()
        ids = labels if self.category_ids is None else [self.category_ids[label - 1] for label in labels]
        return {"boxes": res["boxes"].tolist(), "labels": labels, "category_ids": ids,
                "scores": res["scores"].tolist(), "names": res["names"], "masks": res.get("masks", []),
                "height": int(image.shape[-2]), "width": int(image.shape[-1]), "error": None}


def predict_dataset(ds: "ray.data.Dataset", model: str, *, concurrency: int = 1, num_cpus: float = 1,
                    num_gpus: float = 0, batch_size: int = 8, **kwargs: Any) -> "ray.data.Dataset":
    """``ds`` mapped through ``Predictor(model, **kwargs)`` on ``concurrency`` actors of
    ``num_cpus`` CPUs (and ``num_gpus`` GPUs) each, ``batch_size`` rows per call (lazy, as Ray Data
    is: nothing runs until the dataset is consumed, e.g. by ``write_parquet`` or ``iter_rows``)."""
    return ds.map_batches(Predictor, fn_constructor_args=(model,), fn_constructor_kwargs=kwargs,
                          batch_size=batch_size, batch_format="numpy", num_cpus=num_cpus, num_gpus=num_gpus,
                          compute=ray.data.ActorPoolStrategy(size=concurrency))


class RayEngine:
    """The engine of ``hrnetdet predict --engine ray`` (see ``predict_run.LocalEngine`` for the
    members): the run's images go to ``actors`` Predictor actors on the Ray cluster at ``address``
    (default: the Ray this process is connected to, else ``ray.init``'s: $RAY_ADDRESS, a Ray
    started on this machine, else a new one), which build the model from ``spec``
    (``Predictor``'s arguments); ``model``, the same model built here, says what the results are
    (categories, test scale), so run.json and results.json are a local run's. The files are read
    where the actors run, at their absolute paths (URLs are downloaded there); pictures are drawn
    here, from the files."""

    def __init__(self, model: nn.Module, spec: Dict[str, Any], *, address: Optional[str] = None,
                 actors: Optional[int] = None):
        self.local = LocalEngine(model)
        self.categories = self.local.categories
        self.spec, self.address, self.actors = spec, address, actors

    @classmethod
    def from_args(cls, model: nn.Module, args: Any) -> "RayEngine":
        """The engine of the CLI's flags (``--model``, weights, sizes, ``--fast``/``--backend``,
        ``--ray-address``, ``--ray-actors``), with the model the CLI built from them."""
        spec = {"model": _absolute(args.model) if os.path.isdir(args.model) else args.model,
                "pretrained": args.pretrained or names_weights(args.model),
                "checkpoint_path": _absolute(args.checkpoint_path), "backend": args.backend, "fast": args.fast,
                "int8": _int8_where_actors_run(int8_kwargs(args)), "settings": given_settings(args)}
        return cls(model, spec, address=args.ray_address, actors=args.ray_actors)

    def category_ids(self) -> Optional[List[int]]:
        return self.local.category_ids()

    def describe(self) -> Dict[str, Any]:
        return self.local.describe()

    def place(self, options: PredictOptions, rank: int, world: int) -> PredictOptions:
        """Connects to Ray; ``actors`` defaults to one per CPU (per GPU with a CUDA ``device``) of the cluster."""
        if not ray.is_initialized():
            ray.init(address=self.address)
        ray.data.DataContext.get_current().enable_progress_bars = False  # the run's own bar counts inputs
        if self.actors is None:
            resources = ray.cluster_resources()
            self.actors = max(1, int(resources.get("GPU" if self._gpus(options) else "CPU", 1)))
        return options

    @staticmethod
    def _gpus(options: PredictOptions) -> float:
        return 1 if options.device is not None and options.device.startswith("cuda") else 0

    def predictions(self, items: Sequence[str], options: PredictOptions, indices: Sequence[int]
                    ) -> Iterator[Dict[str, Any]]:
        """Results as the rows come back (in any order), each with the input's ``height`` and
        ``width``; a video is an error, said here (no actor starts for it)."""
        given = {i: item for i, item in zip(indices, items) if not is_video(item)}
        for i, item in zip(indices, items):
            if i not in given:
                yield {"input_index": i, "file_name": item, "error": video_refusal(item)}
        if not given:
            return
        sent = {i: item if is_url(item) else _absolute(item) for i, item in given.items()}
        ds = ray.data.from_items([{"input_index": i, "path": path} for i, path in sent.items()])
        spec = dict(self.spec)
        rows = predict_dataset(ds, spec.pop("model"), concurrency=self.actors, num_gpus=self._gpus(options),
                               batch_size=options.batch_size, options=options, **spec)
        for row in rows.iter_rows():
            i = row["input_index"]
            res: Dict[str, Any] = {"input_index": i, "file_name": given[i]}
            if row["error"] is not None:  # named as the local run names it
                res["error"] = row["error"].replace(repr(sent[i]), repr(given[i]))
                yield res
                continue
            res.update(boxes=torch.tensor(row["boxes"], dtype=torch.float32).reshape(-1, 4),
                       labels=torch.tensor(row["labels"], dtype=torch.int64),
                       scores=torch.tensor(row["scores"], dtype=torch.float32), names=list(row["names"]),
                       height=row["height"], width=row["width"])
            if "masks" in row:
                res["masks"] = list(row["masks"])
            yield res


def _absolute(path: Optional[str]) -> Optional[str]:
    """``path`` as the actors must read it: absolute (they do not run in this folder)."""
    return os.path.abspath(path) if path is not None else None


def _int8_where_actors_run(int8: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """``--int8``'s keywords with the calibration's paths absolute, as the actors read them."""
    if not int8:
        return None
    calibration = int8["calibration"]
    paths = tuple(_absolute(p) for p in calibration) if isinstance(calibration, tuple) else _absolute(calibration)
    return {**int8, "calibration": paths}
