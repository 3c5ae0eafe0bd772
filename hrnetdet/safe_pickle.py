"""A pickle reader for checkpoints that is safe by construction, whatever the bytes hold.

It is a small interpreter of pickle's opcodes, decoded by ``pickletools`` (which checks every length
against the bytes that are there), that builds only plain values (numbers, strings, bytes, lists,
tuples, dicts, sets), tensors over storages its caller hands it, and numpy arrays and scalars of
plain numeric dtypes from bytes whose length fits their shape. Nothing named in the file is ever
called: every other class or function becomes an inert placeholder named after it. Nesting is
bounded, so nothing later recurses past Python's stack. Whatever is wrong is a ``Refused`` with a
one-line reason. Python's own unpickler cannot give these guarantees: it calls what the file names
(numpy's ``__setstate__`` turns forged bytes into object pointers) and allocates what the file asks
for (``bytearray(2**31)``).
"""
import collections
import codecs
import functools
import io
import pickletools
import sys
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

MAX_DEPTH = 100  # containers inside containers; a trainer's checkpoint nests fewer than 10


class Refused(ValueError):
    """A pickle this reader will not build, with a one-line reason."""


class Unpickled:
    """Stands in for an object of a class the reader does not build (an mmengine ``HistoryBuffer``,
    a ``ConfigDict``, or worse): inert, it keeps nothing and runs nothing."""


@functools.lru_cache(maxsize=None)
def placeholder(module: str, name: str) -> type:
    return type(name, (Unpickled,), {"__module__": module, "__qualname__": name})


def placeholder_name(obj: Unpickled) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


# -- numpy: dtypes and arrays are requests, resolved only for plain numeric dtypes ---------------

PLAIN_DTYPES = {"b1", "?", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16",
                "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                "float16", "float32", "float64", "complex64", "complex128"}


class _NumpyRequest:
    """A numpy value the pickle asks for; ``built`` is the value once its state is known and safe."""
    built: Any = None


class _DTypeRequest(_NumpyRequest):
    def __init__(self, type_string: Any, align: Any = False, copy: Any = True):
        if isinstance(type_string, str) and type_string in PLAIN_DTYPES:
            self.built = np.dtype(type_string)

    def set_state(self, state: Any) -> None:
        """``(version, byteorder, subarray, names, fields, elsize, alignment, flags)``: only a
        byte order may change a plain dtype; fields, subarrays and flags leave it unbuilt."""
        if (self.built is None or not isinstance(state, tuple) or len(state) < 5
                or any(s is not None for s in state[2:5]) or state[1] not in ("<", ">", "|", "=")):
            self.built = None
        elif state[1] in ("<", ">"):
            self.built = self.built.newbyteorder(state[1])


class _ArrayRequest(_NumpyRequest):
    def set_state(self, state: Any) -> None:
        """``([version,] shape, dtype, is_fortran, raw bytes)``: built when the bytes are exactly
        the shape's worth of a plain dtype."""
        if isinstance(state, tuple) and len(state) == 5:
            state = state[1:]
        if not (isinstance(state, tuple) and len(state) == 4):
            return
        shape, dtype, fortran, raw = state
        dtype = dtype.built if isinstance(dtype, _DTypeRequest) else None
        if (dtype is None or not isinstance(raw, bytes) or not isinstance(shape, tuple)
                or not all(type(n) is int and n >= 0 for n in shape)):
            return
        count = 1
        for n in shape:
            count *= n
        if count * dtype.itemsize == len(raw):
            self.built = np.frombuffer(raw, dtype).reshape(shape, order="F" if fortran else "C").copy()


def _numpy_scalar(dtype: Any, raw: Any = None) -> Any:
    if isinstance(dtype, _DTypeRequest) and dtype.built is not None and isinstance(raw, bytes) \
            and len(raw) == dtype.built.itemsize:
        return np.frombuffer(raw, dtype.built)[0]
    return placeholder("numpy", "generic")()


def _numpy_reconstruct(cls: Any, shape: Any, typecode: Any) -> _ArrayRequest:
    return _ArrayRequest()


# -- torch: storages come from the caller, tensors are views checked against them -------------

class StorageType:
    """``torch.FloatStorage`` and the like, as a persistent id names them: just their dtype."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


STORAGE_DTYPES = {"DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
                  "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
                  "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                  "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64,
                  "ComplexDoubleStorage": torch.complex128, "UntypedStorage": torch.uint8}


class Storage:
    """A flat tensor of a storage's elements, as the caller's persistent-id reader returns it."""

    def __init__(self, flat: torch.Tensor):
        self.flat = flat


def _ints(value: Any, what: str) -> Tuple[int, ...]:
    if not (isinstance(value, (tuple, list, torch.Size)) and all(type(n) is int and n >= 0 for n in value)):
        raise Refused(f"a tensor's {what} is not a tuple of non-negative integers")
    return tuple(value)


def _view(storage: Any, offset: Any, size: Any, stride: Any, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The tensor ``torch.as_strided`` would make, once every element it reaches is in the storage."""
    if not isinstance(storage, Storage):
        raise Refused("a tensor whose storage is not one of the file's storages")
    flat = storage.flat
    if dtype is not None and dtype != flat.dtype:
        if flat.dtype != torch.uint8 or flat.numel() % torch.empty((), dtype=dtype).element_size():
            raise Refused("a tensor whose dtype does not fit its storage")
        flat = flat.view(dtype)
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if type(offset) is not int or offset < 0 or len(size) != len(stride):
        raise Refused("a tensor with a bad storage offset or a stride that does not fit its size")
    last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else offset - 1
    if last >= flat.numel() or offset > flat.numel():
        raise Refused(f"a tensor reaching element {last} of a storage of {flat.numel()}")
    return flat.as_strided(size, stride, offset)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> torch.Tensor:
    return _view(storage, offset, size, stride)


def _rebuild_tensor_v3(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                       hooks: Any = None, dtype: Any = None, *_: Any) -> torch.Tensor:
    if not isinstance(dtype, torch.dtype):
        raise Refused("a tensor without a dtype")
    return _view(storage, offset, size, stride, dtype)


def _rebuild_parameter(data: Any, requires_grad: Any = False, *_: Any) -> torch.nn.Parameter:
    if not isinstance(data, torch.Tensor) or type(requires_grad) is not bool:
        raise Refused("a parameter that is not a tensor")
    return torch.nn.Parameter(data, requires_grad=requires_grad and data.is_floating_point())


# -- plain builtins, with their arguments checked so that none allocates beyond the file -------

def _collection(kind: type) -> Callable[..., Any]:
    def build(items: Any = ()) -> Any:
        if not isinstance(items, (list, tuple, set, frozenset, dict)):
            raise Refused(f"{kind.__name__} of a {type(items).__name__}")
        return kind(items)
    return build


def _bytearray(data: Any = b"") -> bytearray:
    if not isinstance(data, (bytes, bytearray)):
        raise Refused("bytearray of something other than bytes")
    return bytearray(data)


def _encode(text: Any, encoding: Any = "utf-8", *_: Any) -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
        raise Refused("_codecs.encode of something other than text in a known encoding")
    return codecs.encode(text, encoding)


def _complex(real: Any = 0, imag: Any = 0) -> complex:
    if not all(type(v) in (int, float) for v in (real, imag)):
        raise Refused("complex of something other than numbers")
    return complex(real, imag)


def _slice(*args: Any) -> slice:
    if len(args) > 3 or not all(a is None or type(a) is int for a in args):
        raise Refused("slice of something other than integers")
    return slice(*args)


def _torch_size(dims: Any = ()) -> torch.Size:
    return torch.Size(_ints(dims, "size"))


def _torch_device(kind: Any, index: Any = None) -> torch.device:
    if not isinstance(kind, str) or len(kind) > 32 or not (index is None or type(index) is int):
        raise Refused("torch.device of something other than a device name")
    return torch.device(kind) if index is None else torch.device(kind, index)


_NUMPY_CORE = {"_reconstruct": _numpy_reconstruct, "scalar": _numpy_scalar}
BUILDERS: Dict[Tuple[str, str], Callable[..., Any]] = {
    ("collections", "OrderedDict"): _collection(collections.OrderedDict),
    ("builtins", "set"): _collection(set), ("builtins", "frozenset"): _collection(frozenset),
    ("builtins", "bytearray"): _bytearray, ("builtins", "complex"): _complex, ("builtins", "slice"): _slice,
    ("_codecs", "encode"): _encode,
    ("torch", "Size"): _torch_size, ("torch", "device"): _torch_device,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor, ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("numpy", "dtype"): _DTypeRequest,
    **{(m, n): f for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n, f in _NUMPY_CORE.items()},
}
_BUILDER_IDS = {id(f) for f in BUILDERS.values()}
NDARRAY = placeholder("numpy", "ndarray")  # only ever an argument of _reconstruct


def find_global(module: str, name: str) -> Any:
    """What a GLOBAL opcode names: a builder above, a torch dtype or storage type, or a placeholder.
    A torch or numpy name that does not exist is refused (it is no checkpoint's)."""
    if (module, name) in BUILDERS:
        return BUILDERS[module, name]
    if module == "numpy" and name == "ndarray":
        return NDARRAY
    if module == "torch":
        found = getattr(torch, name, None) if name.isidentifier() else None
        if isinstance(found, torch.dtype):
            return found
        if name in STORAGE_DTYPES:
            return StorageType(STORAGE_DTYPES[name])
    root = module.partition(".")[0]
    if root in ("torch", "numpy"):
        owner = sys.modules.get(module)
        if owner is not None and name not in vars(owner):
            raise Refused(f"its pickle names {module}.{name}, which does not exist")
    return placeholder(module, name)


# -- the interpreter ---------------------------------------------------------------------------

class _Mark:
    pass


_MARK = _Mark()
_CONTAINERS = (list, tuple, dict, set, frozenset)


class _Machine:
    """The stack holds ``[value, depth]`` pairs: depth bounds how deep a value nests, checked as
    each container is made or filled (tuples and frozensets are hashed, which recurses in C)."""

    def __init__(self, persistent_load: Callable[[Any], Any]):
        self.stack: List[List[Any]] = []
        self.memo: Dict[int, List[Any]] = {}
        self.persistent_load = persistent_load

    def push(self, value: Any, depth: int = 0) -> None:
        if depth > MAX_DEPTH:
            raise Refused(f"values nested deeper than {MAX_DEPTH} levels")
        self.stack.append([value, depth])

    def pop(self) -> List[Any]:
        if not self.stack or self.stack[-1][0] is _MARK:
            raise Refused("a malformed pickle (its stack runs empty)")
        return self.stack.pop()

    def pop_mark(self) -> List[List[Any]]:
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] is _MARK:
                items = self.stack[i + 1:]
                del self.stack[i:]
                return items
        raise Refused("a malformed pickle (no mark)")

    def top(self) -> List[Any]:
        if not self.stack or self.stack[-1][0] is _MARK:
            raise Refused("a malformed pickle (its stack runs empty)")
        return self.stack[-1]

    def deepen(self, entry: List[Any], items: List[List[Any]]) -> None:
        entry[1] = max([entry[1]] + [d + 1 for _, d in items])
        if entry[1] > MAX_DEPTH:
            raise Refused(f"values nested deeper than {MAX_DEPTH} levels")

    def container(self, value: Any, items: List[List[Any]]) -> None:
        self.push(value, max([1] + [d + 1 for _, d in items]))

    def call(self, func: Any, args: Any) -> Any:
        if isinstance(func, type) and issubclass(func, Unpickled):
            return func()
        if id(func) not in _BUILDER_IDS:
            raise Refused(f"its pickle calls a {type(func).__name__}, which is not a constructor")
        if not isinstance(args, tuple):
            raise Refused("a call whose arguments are not a tuple")
        return func(*args)

    def run(self, data: Iterator[Tuple[Any, Any, Any]]) -> Any:
        for op, arg, _ in data:
            name = op.name
            if name == "STOP":
                value = self.pop()[0]
                return value.built if isinstance(value, _ArrayRequest) and value.built is not None else value
            self.step(name, arg)
        raise Refused("a pickle without its end (truncated)")

    def step(self, name: str, arg: Any) -> None:
        if name in ("PROTO", "FRAME"):
            return
        if name in _PUSHES:
            self.push(bytearray(arg) if name == "BYTEARRAY8" else arg)
        elif name in ("NONE", "NEWTRUE", "NEWFALSE"):
            self.push({"NONE": None, "NEWTRUE": True, "NEWFALSE": False}[name])
        elif name == "MARK":
            self.stack.append([_MARK, 0])
        elif name == "POP":
            self.stack.pop() if self.stack else self.pop()
        elif name == "POP_MARK":
            self.pop_mark()
        elif name == "DUP":
            self.stack.append(list(self.top()))
        elif name in ("EMPTY_LIST", "EMPTY_DICT", "EMPTY_TUPLE", "EMPTY_SET"):
            self.push({"EMPTY_LIST": list, "EMPTY_DICT": dict, "EMPTY_TUPLE": tuple, "EMPTY_SET": set}[name](), 1)
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            items = [self.pop() for _ in range(int(name[-1]))][::-1]
            self.container(tuple(v for v, _ in items), items)
        elif name in ("TUPLE", "LIST", "FROZENSET"):
            items = self.pop_mark()
            kind = {"TUPLE": tuple, "LIST": list, "FROZENSET": frozenset}[name]
            self.container(self.hashing(kind, [v for v, _ in items]), items)
        elif name == "DICT":
            items = self.pop_mark()
            value: Dict[Any, Any] = {}
            self.set_items(value, items)
            self.container(value, items)
        elif name in ("APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS"):
            items = [self.pop()] if name == "APPEND" else [self.pop(), self.pop()][::-1] if name == "SETITEM" \
                else self.pop_mark()
            target = self.top()
            self.fill(target, name, items)
        elif name in ("GLOBAL", "INST"):
            module, _, attr = arg.partition(" ")
            found = find_global(module, attr)
            self.push(found if name == "GLOBAL" else self.call(found, tuple(v for v, _ in self.pop_mark())))
        elif name == "STACK_GLOBAL":
            attr, module = self.pop()[0], self.pop()[0]
            if not (isinstance(module, str) and isinstance(attr, str)):
                raise Refused("a malformed pickle (a global named by something other than text)")
            self.push(find_global(module, attr))
        elif name == "OBJ":
            items = self.pop_mark()
            if not items:
                raise Refused("a malformed pickle (OBJ without a class)")
            self.push(self.call(items[0][0], tuple(v for v, _ in items[1:])))
        elif name in ("REDUCE", "NEWOBJ", "NEWOBJ_EX"):
            if name == "NEWOBJ_EX":
                self.pop()
            args = self.pop()
            func = self.pop()[0]
            self.push(self.call(func, args[0]), args[1] + 1)
        elif name == "BUILD":
            state = self.pop()[0]
            value = self.top()[0]
            if isinstance(value, (_DTypeRequest, _ArrayRequest)):
                value.set_state(state)
                if value.built is not None and isinstance(value, _ArrayRequest):
                    self.top()[0] = value.built
            elif not isinstance(value, (Unpickled, dict)):  # a state dict's _metadata is dropped
                raise Refused(f"its pickle sets the state of a {type(value).__name__}")
        elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            self.memo[len(self.memo) if name == "MEMOIZE" else arg] = self.top()
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            if arg not in self.memo:
                raise Refused("a malformed pickle (it refers to a value it never stored)")
            value, depth = self.memo[arg]
            self.push(value.built if isinstance(value, _ArrayRequest) and value.built is not None else value, depth)
        elif name in ("PERSID", "BINPERSID"):
            self.push(self.persistent_load(arg if name == "PERSID" else self.pop()[0]))
        else:  # EXT1/2/4 (the copyreg extension registry), out-of-band buffers
            raise Refused(f"its pickle uses {name}, which no checkpoint needs")

    @staticmethod
    def hashing(kind: type, values: List[Any]) -> Any:
        try:
            return kind(values)
        except TypeError:
            raise Refused("a set or dict key that cannot be hashed") from None

    def set_items(self, target: Any, items: List[List[Any]]) -> None:
        if len(items) % 2:
            raise Refused("a malformed pickle (a dict key without its value)")
        for i in range(0, len(items), 2):
            try:
                target[items[i][0]] = items[i + 1][0]
            except TypeError:
                raise Refused("a set or dict key that cannot be hashed") from None

    def fill(self, target: List[Any], name: str, items: List[List[Any]]) -> None:
        value = target[0]
        if isinstance(value, Unpickled):
            return  # what an object of a class the reader does not build holds is dropped
        if name in ("APPEND", "APPENDS") and isinstance(value, list):
            value.extend(v for v, _ in items)
        elif name in ("SETITEM", "SETITEMS") and isinstance(value, dict):
            self.set_items(value, items)
        elif name == "ADDITEMS" and isinstance(value, set):
            for v, _ in items:
                self.hashing(frozenset, [v])
                value.add(v)
        else:
            raise Refused(f"its pickle applies {name} to a {type(value).__name__}")
        self.deepen(target, items)


_PUSHES = {"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT", "STRING",
           "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8",
           "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8"}


def load(stream: io.BytesIO, persistent_load: Callable[[Any], Any]) -> Any:
    """The value the pickle at ``stream``'s position holds; the stream is left just past it."""
    try:
        return _Machine(persistent_load).run(pickletools.genops(stream))
    except Refused:
        raise
    except (ValueError, TypeError, OverflowError, RuntimeError, KeyError, IndexError, EOFError,
            UnicodeDecodeError, MemoryError) as e:  # pickletools' length checks, torch's own argument checks
        raise Refused(f"a malformed pickle ({type(e).__name__}: {_one_line(e)})") from None


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:160] if text else ""


def walk(value: Any) -> Iterator[Any]:
    """Every value inside ``value`` (dicts' keys and values, lists, tuples, sets), each once,
    without recursion."""
    seen, todo = set(), [value]
    while todo:
        v = todo.pop()
        if isinstance(v, _CONTAINERS):
            if id(v) in seen:
                continue
            seen.add(id(v))
            todo.extend(list(v.keys()) + list(v.values()) if isinstance(v, dict) else v)
        yield v
