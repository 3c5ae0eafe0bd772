"""Runtime backends: a detector's dense parts run by onnxruntime or OpenVINO, the rest by PyTorch.

The dense parts (backbone + neck, the RPN or FCOS head, every RoI box and mask head, HTC's
semantic head) hold nearly all of the arithmetic and take any image size and any number of RoIs,
so they export to ONNX graphs with dynamic shapes for every family. The data-dependent steps
between them (resize, anchors, proposal selection, NMS, RoIAlign, the cascade's refinement, mask
pasting) stay the model's own PyTorch code, so the model keeps torchvision's contract and eager's
arithmetic there. Each part's ``forward`` is swapped for a call into its compiled graph.
"""
import copy
import functools
import hashlib
import json
import os
import shutil
import tempfile
import weakref
from typing import Any, Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten, treespec_dumps, treespec_loads

from ..io import hrnetdet_home
from ..neck.hrfpn import use_fast_neck
from .folding import fold_batchnorm
from .thresholds import score_threshold
from .winograd import MIN_CHANNELS, use_winograd

BACKENDS = ("onnxruntime", "openvino")
# Parts whose inputs scale with the image; the RoI parts' first dimension is the number of RoIs.
IMAGE_PARTS = ("backbone", "rpn.head", "head", "roi_heads.semantic_head")
ROI_PARTS = ("box_head", "box_predictor", "mask_head", "mask_predictor")
MANIFEST = "export.json"
EXAMPLE_SIZE = (480, 640)  # the generated image the graphs are traced on (H, W)
EXTRAS = {"onnxruntime": "onnx", "openvino": "openvino", "nncf": "int8"}  # module -> the pip extra that installs it

def require(module: str):
    """Import an optional dependency, or say which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{module} is not installed: pip install 'hrnetdet[{EXTRAS[module]}]'") from None


def dense_parts(model: nn.Module) -> Dict[str, nn.Module]:
    """The submodules that run in the backend, by qualified name."""
    return {name: m for name, m in model.named_modules()
            if name in IMAGE_PARTS or (name.startswith("roi_heads.") and name.rsplit(".", 1)[-1] in ROI_PARTS)}


def _tensor_leaves(leaves: List[Any]) -> List[Tensor]:
    """The call's tensors; ``None`` leaves (an absent optional input) are fixed by the call's spec."""
    return [leaf for leaf in leaves if leaf is not None]


def _with_nones(tensors: Sequence[Tensor], none_at: Sequence[int]) -> List[Any]:
    leaves: List[Any] = list(tensors)
    for i in none_at:
        leaves.insert(i, None)
    return leaves


class _FlatPart(nn.Module):
    """A part with flat tensor inputs and a flat tuple of outputs, as ONNX expresses them."""

    def __init__(self, part: nn.Module, in_spec, none_at: List[int]):
        super().__init__()
        self.part = part
        self.in_spec = in_spec
        self.none_at = none_at
        self.out_spec = None

    def forward(self, *flat: Tensor) -> Tuple[Tensor, ...]:
        args, kwargs = tree_unflatten(_with_nones(flat, self.none_at), self.in_spec)
        out, self.out_spec = tree_flatten(self.part(*args, **kwargs))
        return tuple(out)


def example_inputs(model: nn.Module, image: Tensor) -> Dict[str, Tuple[tuple, dict]]:
    """Each dense part's (args, kwargs) on its first call while the model detects ``image``, with
    every score threshold at 0 so that the mask heads see a full set of detections."""
    parts = dense_parts(model)
    captured: Dict[str, Tuple[tuple, dict]] = {}

    def recorder(name: str):
        def hook(module, args, kwargs):
            captured.setdefault(name, (args, kwargs))
        return hook

    handles = [m.register_forward_pre_hook(recorder(n), with_kwargs=True) for n, m in parts.items()]
    try:
        with score_threshold(model, 0.0), torch.no_grad():
            model.eval()([image])
    finally:
        for h in handles:
            h.remove()
    missing = sorted(set(parts) - set(captured))
    if missing:
        raise RuntimeError(f"parts never called on the example image: {missing}")
    return captured


def export_parts(model: nn.Module, image: Tensor, out_dir: str, *, dynamic: bool = True,
                 opset: int = 17, winograd: bool = True) -> Dict[str, Any]:
    """Write one ONNX graph per dense part of ``model`` into ``out_dir``, traced on the inputs the
    part sees while the model detects ``image``; returns the manifest (also written as export.json).

    RoI parts take any number of RoIs. Image parts take any batch and image size when ``dynamic``,
    else exactly the padded size ``image`` resizes to. The graphs compute the same function with
    less arithmetic (on a copy of ``model``): the neck in ``FastHRFPN``'s order, with the body's batch
    norms folded, and the image parts' convolutions of ``MIN_CHANNELS`` channels or more as Winograd
    F(4x4, 3x3) (``winograd.py``) unless ``winograd`` is off (the int8 graphs' source: an int8
    convolution beats both, and the Winograd domain's products lose more to int8 rounding)."""
    os.makedirs(out_dir, exist_ok=True)
    model = use_fast_neck(copy.deepcopy(model))
    fold_batchnorm(model.backbone.body)
    parts = dense_parts(model)
    for name in IMAGE_PARTS if winograd else ():
        if name in parts:
            use_winograd(parts[name])  # swaps convolutions inside the part: ``parts`` stays valid
    manifest: Dict[str, Any] = {"parts": {}}
    for name, (args, kwargs) in example_inputs(model, image).items():
        leaves, in_spec = tree_flatten((args, kwargs))
        none_at = [i for i, leaf in enumerate(leaves) if leaf is None]
        flat_in = _tensor_leaves(leaves)
        flat = _FlatPart(parts[name], in_spec, none_at)
        with torch.no_grad():
            outs = flat(*flat_in)
        in_names = [f"input_{i}" for i in range(len(flat_in))]
        out_names = [f"output_{i}" for i in range(len(outs))]
        if name in IMAGE_PARTS:
            axes = {n: list(range(t.dim())) for n, t in zip(in_names, flat_in)} if dynamic else {}
        else:
            axes = {n: [0] for n in in_names}
        axes.update({n: list(range(o.dim())) for n, o in zip(out_names, outs)})
        file = f"{name}.onnx"
        torch.onnx.export(flat, tuple(flat_in), os.path.join(out_dir, file), dynamo=False,
                          opset_version=opset, input_names=in_names, output_names=out_names,
                          dynamic_axes=axes)
        manifest["parts"][name] = {"file": file, "in_spec": treespec_dumps(in_spec), "none_at": none_at,
                                   "out_spec": treespec_dumps(flat.out_spec)}
    with open(os.path.join(out_dir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


class OnnxRuntimeGraph:
    """One graph in an onnxruntime session."""

    def __init__(self, path: str, threads: int):
        ort = require("onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]

    def run(self, arrays: List[np.ndarray]) -> List[np.ndarray]:
        return self.session.run(None, dict(zip(self.names, arrays)))

    def close(self) -> None:
        self.session = None


@functools.lru_cache(maxsize=None)
def openvino_core():
    """The process's one OpenVINO core, kept until the interpreter exits.

    Its CPU plugin installs an alternate signal stack on the thread that creates it and puts the
    previous one back when it is destroyed. Plugins destroyed in any order but the reverse of their
    creation (one core per graph, freed first-made first), or on another thread, leave the thread
    pointing at a stack already unmapped, and the next signal handled there (Python runs its
    handlers on that stack: a DataLoader worker's SIGCHLD) kills the process or writes over what
    was mapped there since. One core per process: one plugin, installed once, undone at exit."""
    return require("openvino").Core()


class OpenVINOGraph:
    """One graph compiled by the process's OpenVINO core, with its infer request."""

    def __init__(self, path: str, threads: int):
        # f32: on CPUs with bf16 units OpenVINO would otherwise compute in bf16, outside parity.
        self.compiled = openvino_core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                                    "INFERENCE_NUM_THREADS": threads})
        self.request = self.compiled.create_infer_request()

    def run(self, arrays: List[np.ndarray]) -> List[np.ndarray]:
        result = self.request.infer(arrays)
        return [result[o] for o in self.compiled.outputs]

    def close(self) -> None:
        self.request = None  # the request before the compiled model it belongs to
        self.compiled = None


GRAPHS = {"onnxruntime": OnnxRuntimeGraph, "openvino": OpenVINOGraph}


class RuntimeSession:
    """The backend sessions of one model's dense parts, owned in one place so that they are
    released at a known moment (``close``, the end of a ``with`` block) rather than whenever the
    garbage collector reaches the model. A deep copy opens sessions of its own (a closed one's
    copy is closed too)."""

    def __init__(self, export_dir: str, backend: str, names: Sequence[str], threads: int):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.export_dir, self.backend, self.threads = export_dir, backend, threads
        with open(os.path.join(export_dir, MANIFEST)) as f:
            self.parts: Dict[str, Any] = json.load(f)["parts"]
        missing = [n for n in names if n not in self.parts]
        if missing:
            raise ValueError(f"{export_dir}: no graph for part {missing[0]!r}; export this model again")
        self.graphs: Dict[str, Any] = {}
        try:
            for name in names:
                self.graphs[name] = GRAPHS[backend](os.path.join(export_dir, self.parts[name]["file"]), threads)
        except BaseException:
            self.close()
            raise

    @property
    def closed(self) -> bool:
        return not self.graphs

    def run(self, name: str, arrays: List[np.ndarray]) -> List[np.ndarray]:
        if self.closed:
            raise RuntimeError(f"{name}: this model's {self.backend} sessions are closed; "
                               "make it again with optimize_for_inference(model, backend=...)")
        return self.graphs[name].run(arrays)

    def close(self) -> None:
        """Release every session now; the model refuses to run afterwards. Idempotent."""
        for graph in self.graphs.values():
            graph.close()
        self.graphs = {}

    def __enter__(self) -> "RuntimeSession":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __deepcopy__(self, memo: Dict[int, Any]) -> "RuntimeSession":
        return RuntimeSession(self.export_dir, self.backend, list(self.graphs), self.threads)


class PartForward:
    """Stands in for a part's ``forward``: flattens the call, runs the part's graph in the
    model's ``RuntimeSession``, rebuilds the output."""

    def __init__(self, name: str, session: RuntimeSession, in_spec, none_at: List[int], out_spec):
        self.name, self.session, self.in_spec, self.none_at, self.out_spec = name, session, in_spec, none_at, out_spec

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        leaves, spec = tree_flatten((args, kwargs))
        if spec != self.in_spec or [i for i, leaf in enumerate(leaves) if leaf is None] != self.none_at:
            raise ValueError(f"{self.name}: called with {spec}, exported for {self.in_spec}")
        flat = _tensor_leaves(leaves)
        device = flat[0].device
        outs = self.session.run(self.name, [t.detach().float().cpu().contiguous().numpy() for t in flat])
        return tree_unflatten([torch.from_numpy(np.asarray(o)).to(device) for o in outs], self.out_spec)


def attach(model: nn.Module, export_dir: str, backend: str) -> nn.Module:
    """Swap every dense part's ``forward`` of ``model`` (in place) for the graph in ``export_dir``
    run by ``backend`` with torch's intra-op thread count; returns the model, in eval mode.

    The sessions belong to ``model.runtime`` (a ``RuntimeSession``): ``model.runtime.close()`` or
    ``with model.runtime: ...`` releases them; sessions attached before are closed first."""
    if isinstance(getattr(model, "runtime", None), RuntimeSession):
        model.runtime.close()
    return use_session(model, RuntimeSession(export_dir, backend, list(dense_parts(model)), torch.get_num_threads()))


def use_session(model: nn.Module, session: RuntimeSession) -> nn.Module:
    """``model`` (changed in place, in eval mode) with its dense parts run in ``session``, which
    becomes ``model.runtime``."""
    for name, part in dense_parts(model).items():
        entry = session.parts[name]
        part.forward = PartForward(name, session, treespec_loads(entry["in_spec"]), entry["none_at"],
                                   treespec_loads(entry["out_spec"]))
    model.runtime = session
    return model.eval()


def generated_image(height: int, width: int, seed: int = 0) -> Tensor:
    """A deterministic CHW image in [0, 1]: smooth colour fields with sharp-edged rectangles, so
    that a detector finds edges and blobs at every scale."""
    g = torch.Generator().manual_seed(seed)
    field = torch.rand(1, 3, max(height // 32, 2), max(width // 32, 2), generator=g)
    image = torch.nn.functional.interpolate(field, size=(height, width), mode="bilinear", align_corners=False)[0]
    for _ in range(12):
        y0 = int(torch.randint(0, height - 8, (1,), generator=g))
        x0 = int(torch.randint(0, width - 8, (1,), generator=g))
        h = int(torch.randint(8, max(height // 3, 9), (1,), generator=g))
        w = int(torch.randint(8, max(width // 3, 9), (1,), generator=g))
        image[:, y0:y0 + h, x0:x0 + w] = torch.rand(3, 1, 1, generator=g)
    return image


def cache_key(model: nn.Module, opset: int = 17, winograd: bool = True) -> str:
    """The name of ``model``'s folder in the export cache: a hash of the architecture, the weights'
    bytes, the export settings and the versions of everything that writes or reads the graphs."""
    from ..version import __version__

    h = hashlib.sha256(repr(model).encode())
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    settings = {"dynamic": True, "opset": opset, "neck": "FastHRFPN", "winograd": MIN_CHANNELS if winograd else None,
                "hrnetdet": __version__, "torch": torch.__version__}
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:24]


def cached_folder(cache_dir: str, key: str, write: Callable[[str], Any]) -> str:
    """``cache_dir/key``, made by ``write(folder)`` unless it holds a manifest already.

    Written into a private temporary folder and renamed into place, so concurrent processes never
    see a partial folder; when two race, the first rename wins and the other's copy is dropped."""
    final = os.path.join(cache_dir, key)
    if os.path.exists(os.path.join(final, MANIFEST)):
        return final
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{key}.", dir=cache_dir)
    try:
        write(tmp)
        try:
            os.rename(tmp, final)
        except OSError:  # another process renamed its copy first
            if not os.path.exists(os.path.join(final, MANIFEST)):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def cached_export(model: nn.Module, cache_dir: str, opset: int = 17, winograd: bool = True) -> str:
    """The folder holding ``model``'s dynamic graphs, exported once per weights and settings."""
    return cached_folder(cache_dir, cache_key(model, opset, winograd),
                         lambda out: export_parts(model, generated_image(*EXAMPLE_SIZE), out, dynamic=True,
                                                  opset=opset, winograd=winograd))


# ``auto``'s preference on the CPU, the fastest first: in benchmarks/export_results.md OpenVINO beat
# onnxruntime in computation time on every family at one thread and on every target model at two.
AUTO_ORDER: Sequence[str] = ("openvino", "onnxruntime")


def default_backend() -> str:
    """``auto``: the first installed backend of ``AUTO_ORDER``."""
    import importlib.util

    for backend in AUTO_ORDER:
        if importlib.util.find_spec(backend) is not None:
            return backend
    raise ImportError("backend 'auto' needs onnxruntime or openvino: pip install 'hrnetdet[onnx]'")


def resolve_backend(backend: str) -> str:
    """``backend`` with ``auto`` resolved, checked and importable."""
    if backend == "auto":
        backend = default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    require(backend)
    return backend


def default_cache_dir() -> str:
    return os.path.join(hrnetdet_home(), "exports")


def runtime_model(model: nn.Module, backend: str = "auto", cache_dir: str = "") -> nn.Module:
    """``model`` (changed in place) with its dense parts run by ``backend``, exported once into
    ``cache_dir`` (default ``$HRNETDET_HOME/exports``); ``model.runtime`` owns the sessions."""
    backend = resolve_backend(backend)
    return attach(model, cached_export(model.eval(), cache_dir or default_cache_dir()), backend)


# The sessions ``runtime_copy`` opened for each eager model, by backend: they live as long as the
# model (or until ``close_runtime``), so repeated ``predict(model, backend=...)`` calls reuse them.
_KEPT: "weakref.WeakKeyDictionary[nn.Module, Dict[str, RuntimeSession]]" = weakref.WeakKeyDictionary()


def runtime_copy(model: nn.Module, backend: str = "auto", cache_dir: str = "") -> nn.Module:
    """A copy of ``model`` with its dense parts run by ``backend``, on sessions kept with ``model``
    and reused while its weights and torch's thread count stay the same. ``model`` is unchanged;
    the copy takes its current settings (thresholds, sizes) on every call."""
    backend = resolve_backend(backend)
    folder = cached_export(model.eval(), cache_dir or default_cache_dir())
    kept = _KEPT.setdefault(model, {})
    session = kept.get(backend)
    threads = torch.get_num_threads()
    if session is None or session.closed or (session.export_dir, session.threads) != (folder, threads):
        if session is not None:
            session.close()
        session = kept[backend] = RuntimeSession(folder, backend, list(dense_parts(model)), threads)
    return use_session(copy.deepcopy(model), session)


def close_runtime(model: nn.Module) -> None:
    """Close the runtime sessions of ``model``: its own (``model.runtime``) and those that
    ``predict(model, backend=...)`` keeps for it."""
    own = getattr(model, "runtime", None)
    if isinstance(own, RuntimeSession):
        own.close()
    for session in _KEPT.pop(model, {}).values():
        session.close()
