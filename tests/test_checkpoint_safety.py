"""The checkpoint reader is safe whatever the file holds: hostile pickles and torch zips, and byte
mutations of a small mmengine-era checkpoint, each end in a result or a one-line CheckpointError,
never a signal, a traceback, code run, or memory the file's size does not justify.

Every file is read in a child process (a crash must not take pytest with it) under an address-space
limit of its baseline plus 1.5 GB, so an allocation bomb fails the test instead of the machine. The
mutations come from Hypothesis, not atheris: the reader is pure Python, so coverage-guided libFuzzer
(which needs a compiled atheris wheel for this Python) would add a build for little gain, while
Hypothesis is already a dev dependency, replays a derandomized run exactly (the default suite runs
the same cases every time) and shrinks a failing mutation to the fewest changed bytes.
"""
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from collections import OrderedDict

import numpy as np
import pytest
import torch

from reference_layout import mmengine_classes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMIT_BYTES = 1536 << 20

CHILD = r'''
import json, os, resource, sys, traceback
from hrnetdet.zoo.checkpoint import read_checkpoint
from hrnetdet.zoo.convert import CheckpointError

def vm_bytes():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmSize:")) * 1024

base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
resource.setrlimit(resource.RLIMIT_AS, (vm_bytes() + ADDRESS_SPACE_MARGIN, resource.RLIM_INFINITY))

def outcome(path):
    """'ok', or 'refused: <message>' for a one-line CheckpointError, or 'BAD: ...' for anything else."""
    try:
        read_checkpoint(path)
        return "ok"
    except CheckpointError as e:
        text = str(e)
        if "\n" in text or " at 0x" in text or path not in text:
            return "BAD: refusal not one clean line naming the file: " + text[:300]
        if "MemoryError" in text or "alloc" in text:  # what an allocation past the limit looks like
            return "BAD: tried to allocate more than the file justifies: " + text[:300]
        return "refused: " + text
    except BaseException as e:
        return "BAD: " + type(e).__name__ + ": " + "".join(traceback.format_exception_only(type(e), e))[:300]

def report(**kw):
    print(json.dumps(kw), flush=True)

mode, args = sys.argv[1], sys.argv[2:]
if mode == "files":
    for path in args:
        report(start=path)
        report(file=path, outcome=outcome(path))
else:
    from hypothesis import HealthCheck, given, settings, strategies as st
    bases = [open(p, "rb").read() for p in args[2:]]
    work, count, tried = args[0], int(args[1]), [0]
    current = os.path.join(work, "current.pth")

    @st.composite
    def mutated(draw):
        data = bytearray(draw(st.sampled_from(bases)))
        for _ in range(draw(st.integers(1, 6))):
            at, kind = draw(st.integers(0, len(data) - 1)), draw(st.sampled_from("sdib"))
            if kind == "s":
                data[at] = draw(st.integers(0, 255))
            elif kind == "b":  # a plausible big length or count
                data[at:at + 4] = draw(st.sampled_from([b"\xff\xff\xff\x7f", b"\x00\x00\x00\x80", b"\xff\xff\xff\xff"]))
            elif kind == "d":
                del data[at:at + draw(st.integers(1, 16))]
            else:
                data[at:at] = draw(st.binary(min_size=1, max_size=8))
        return bytes(data)

    @settings(max_examples=count, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(mutated())
    def check(data):
        with open(current, "wb") as f:
            f.write(data)
        tried[0] += 1
        result = outcome(current)
        assert not result.startswith("BAD"), result

    check()
    report(tried=tried[0])
report(base_rss_kb=base_rss, peak_rss_kb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
'''.replace("ADDRESS_SPACE_MARGIN", str(LIMIT_BYTES))


def _run_child(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", CHILD, *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return proc, lines


def _assert_peak(lines):
    peak = next(line for line in lines if "peak_rss_kb" in line)
    assert (peak["peak_rss_kb"] - peak["base_rss_kb"]) * 1024 < LIMIT_BYTES, peak


# -- a small mmengine-era checkpoint, as an mmengine trainer saves one --------------------------

def _mmengine_checkpoint():
    """torch.save of a state dict (float, int64 and bool tensors, a view) beside numpy scalars and
    arrays, a HistoryBuffer and a ConfigDict (classes at mmengine's paths, gone after saving)."""
    with mmengine_classes() as (HistoryBuffer, ConfigDict):
        weight = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(0))
        sd = OrderedDict([("backbone.conv1.weight", weight), ("backbone.conv1.bias", weight[:, 0, 0, 0]),
                          ("backbone.bn1.num_batches_tracked", torch.tensor(7)),
                          ("backbone.mask", torch.tensor([True, False, True]))])
        meta = {"epoch": np.int64(12), "lr": np.float32(0.02), "seed": np.array([[1, 2, 3]], dtype=np.int32),
                "flags": np.array([True, False]), "cfg": ConfigDict(model=ConfigDict(type="FasterRCNN")),
                "dataset_meta": {"classes": ("a", "b")}, "env": "torch 2"}
        ckpt = {"meta": meta, "state_dict": sd,
                "message_hub": {"log_scalars": {"train/loss": HistoryBuffer()}, "runtime_info": {"iter": np.int64(90)}}}
        return ckpt, _saved(ckpt, True), _saved(ckpt, False)


def _saved(obj, zipped):
    import io
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=zipped)
    return buf.getvalue()


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    d = tmp_path_factory.mktemp("real")
    ckpt, zipped, legacy = _mmengine_checkpoint()
    (d / "zip.pth").write_bytes(zipped)
    (d / "legacy.pth").write_bytes(legacy)
    return ckpt, d


def test_mmengine_era_checkpoint_reads_exactly(real):
    from hrnetdet.zoo.checkpoint import _torch_load, read_checkpoint
    from hrnetdet.zoo.convert import CheckpointError
    ckpt, d = real
    for name in ("zip.pth", "legacy.pth"):
        got = _torch_load(str(d / name))
        for k, v in ckpt["state_dict"].items():
            assert got["state_dict"][k].dtype == v.dtype and torch.equal(got["state_dict"][k], v), (name, k)
        for k in ("epoch", "lr", "seed", "flags"):
            assert type(got["meta"][k]) is type(ckpt["meta"][k]) and np.array_equal(got["meta"][k], ckpt["meta"][k])
        assert got["meta"]["dataset_meta"] == {"classes": ("a", "b")}
        assert got["message_hub"]["runtime_info"]["iter"] == 90
        assert type(got["meta"]["cfg"]).__module__ == "mmengine.config.config"  # a placeholder
        with pytest.raises(CheckpointError, match="no 'backbone.transition1.0.0.weight' key"):  # read to the end
            read_checkpoint(str(d / name))


# -- hostile files, built by hand --------------------------------------------------------------

def _g(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _u(text):
    return b"X" + struct.pack("<I", len(text.encode())) + text.encode()


def _b(data):
    return b"B" + struct.pack("<I", len(data)) + data


def _i(n):
    return b"J" + struct.pack("<i", n)


def _long(n):
    raw = n.to_bytes(8, "little", signed=True)
    return b"\x8a\x08" + raw


def _torch_zip(pickled, records=()):
    import io
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickled)
        z.writestr("archive/byteorder", "little")
        for key, data in records:
            z.writestr(f"archive/data/{key}", data)
        z.writestr("archive/version", "3\n")
    return buf.getvalue()


def _forged_object_dtype():
    """A record dtype whose two fields are objects, flags cleared, over 16 raw bytes: iterated
    (by OrderedDict), the bytes are dereferenced as object pointers."""
    fields = b"}(" + _u("a") + _g("numpy", "dtype") + _u("O8") + b"\x89\x88\x87R" + _i(0) + b"\x86" \
        + _u("b") + _g("numpy", "dtype") + _u("O8") + b"\x89\x88\x87R" + _i(8) + b"\x86u"
    dtype = _g("numpy", "dtype") + _u("V16") + b"\x89\x88\x87R" + b"(" + _i(3) + _u("|") + b"N" \
        + _u("a") + _u("b") + b"\x86" + fields + _i(16) + _i(1) + _i(0) + b"tb"
    array = _g("numpy.core.multiarray", "_reconstruct") + _g("numpy", "ndarray") + _i(0) + b"\x85" + _b(b"b") \
        + b"\x87R" + b"(" + _i(1) + _i(1) + b"\x85" + dtype + b"\x89" + _b(b"\x41" * 16) + b"tb"
    return b"\x80\x03" + _g("collections", "OrderedDict") + array + b"\x85R."


def _storage_pid(key, numel, storage="FloatStorage"):
    return b"(" + _u("storage") + _g("torch", storage) + _u(key) + _u("cpu") + _long(numel) + b"tQ"


def _tensor(pid, size, stride, offset=0):
    dims = lambda ns: b"(" + b"".join(_long(n) for n in ns) + b"t"
    return _g("torch._utils", "_rebuild_tensor_v2") + b"(" + pid + _long(offset) + dims(size) + dims(stride) \
        + b"\x89" + _g("collections", "OrderedDict") + b")R" + b"tR"


def _state_dict(tensor):
    return b"\x80\x02}" + _u("state_dict") + b"}" + _u("backbone.transition1.0.0.weight") + tensor + b"ss."


class _System:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _hostile(folder):
    """name -> bytes of each hostile file; files that would run code touch ``folder``/ran.txt."""
    marker = os.path.join(folder, "ran.txt")
    deep = b"\x80\x02}" + _u("state_dict") + b"}" + _u("k") + b"]" * 100000 + b"a" * 99999 + b"ss."
    files = {
        "forged_object_dtype.pth": _torch_zip(_forged_object_dtype()),
        "bytearray_2gib.pth": _torch_zip(b"\x80\x02" + _g("builtins", "bytearray") + _long(2 ** 31) + b"\x85R."),
        "ndarray_2gib.pth": _torch_zip(b"\x80\x02" + _g("numpy", "ndarray") + _long(2 ** 31) + b"\x85" + _u("u1")
                                       + b"\x86R."),
        "reconstruct_2gib.pth": _torch_zip(b"\x80\x02" + _g("numpy.core.multiarray", "_reconstruct")
                                           + _g("numpy", "ndarray") + _long(2 ** 31) + b"\x85" + _b(b"b") + b"\x87R."),
        "bytes8_claim.pth": _torch_zip(b"\x80\x04\x8e" + struct.pack("<Q", 2 ** 40) + b"xx."),
        "deep_list.pth": _torch_zip(deep),
        "deep_tuple.pth": _torch_zip(b"\x80\x02" + b")" + b"\x85" * 100000 + b"."),
        "deep_dict_key.pth": _torch_zip(b"\x80\x02}" + b")" + b"\x85" * 5000 + b"Ns."),
        "cyclic_list.pth": _torch_zip(b"\x80\x02}" + _u("state_dict") + b"]q\x00h\x00as."),
        "memo_index_4g.pth": _torch_zip(b"\x80\x02]r\xff\xff\xff\xff."),
        "torch_no_such_name.pth": _torch_zip(b"\x80\x02" + _g("torch", "no_such_thing") + b")R."),
        "numpy_no_such_name.pth": _torch_zip(b"\x80\x02" + _g("numpy", "no_such_thing") + b")R."),
        "os_system.pth": _saved(_System(f"touch {marker}"), True),
        "eval.pth": _torch_zip(b"\x80\x02" + _g("builtins", "eval") + _u(f"open({marker!r}, 'w')") + b"\x85R."),
        "getattr_chain.pth": _torch_zip(b"\x80\x02" + _g("builtins", "getattr") + _g("builtins", "open")
                                        + _u("__call__") + b"\x86R" + _u(marker) + _u("w") + b"\x86R."),
        "storage_bigger_than_file.pth": _torch_zip(_state_dict(_tensor(_storage_pid("0", 2 ** 40), [2 ** 20] * 2,
                                                                        [2 ** 20, 1])), [("0", b"\0" * 16)]),
        "tensor_beyond_storage.pth": _torch_zip(_state_dict(_tensor(_storage_pid("0", 4), [4, 4], [4, 1])),
                                                [("0", b"\0" * 16)]),
        "negative_stride.pth": _torch_zip(_state_dict(_tensor(_storage_pid("0", 4), [2], [-1], 1)),
                                          [("0", b"\0" * 16)]),
        "unknown_storage_type.pth": _torch_zip(_state_dict(_tensor(_storage_pid("0", 4, "NoSuchStorage"), [4], [1])),
                                               [("0", b"\0" * 16)]),
        "missing_storage.pth": _torch_zip(_state_dict(_tensor(_storage_pid("7", 4), [4], [1])), [("0", b"\0" * 16)]),
        "legacy_storage_claim.pth": pickle.dumps(0x1950a86a20f9469cfc6c, 2)
        + pickle.dumps(1001, 2) + pickle.dumps({"little_endian": True}, 2)
        + b"\x80\x02(" + _u("storage") + _g("torch", "FloatStorage") + _u("0") + _u("cpu") + _long(2 ** 33) + b"NtQ.",
        "not_a_checkpoint.pth": b"hello\n",
    }
    zipped = bytearray(_torch_zip(b"\x80\x02}.", [("0", b"\0" * 16)]))
    at = zipped.find(b"PK\x01\x02")  # data.pkl's central directory entry: claim 1 GiB for it
    zipped[at + 20:at + 28] = struct.pack("<II", 1 << 30, 1 << 30)
    files["zip_member_lies.pth"] = bytes(zipped)
    return files


def test_hostile_files_are_refused_in_one_line(tmp_path):
    files = _hostile(str(tmp_path))
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    proc, lines = _run_child("files", *sorted(str(tmp_path / n) for n in files))
    started = [line["start"] for line in lines if "start" in line]
    assert proc.returncode == 0, (f"the reader died (code {proc.returncode}) on {started[-1] if started else '?'}: "
                                  f"{proc.stderr[-800:]}")
    outcomes = {os.path.basename(line["file"]): line["outcome"] for line in lines if "file" in line}
    assert set(outcomes) == set(files)
    bad = {n: o for n, o in outcomes.items() if not o.startswith("refused")}
    assert not bad, bad
    assert not (tmp_path / "ran.txt").exists()
    assert "does not exist" in outcomes["torch_no_such_name.pth"] and "does not exist" in outcomes["unknown_storage_type.pth"]
    assert "nested deeper than" in outcomes["deep_list.pth"]
    _assert_peak(lines)


def test_missing_checkpoint_is_named_in_one_line(tmp_path):
    from hrnetdet.zoo.checkpoint import read_checkpoint
    with pytest.raises(FileNotFoundError, match=r"^no such checkpoint file: .*nowhere\.pth$"):
        read_checkpoint(str(tmp_path / "nowhere.pth"))


def _fuzz(real, tmp_path, examples):
    _, d = real
    with zipfile.ZipFile(d / "zip.pth") as z:
        records = [(n.rpartition("/")[2], z.read(n)) for n in z.namelist() if "/data/" in n]
        pickled = z.read("archive/data.pkl")
    (tmp_path / "small.pth").write_bytes(_torch_zip(pickled, records))  # data.pkl first: mutations reach it
    bases = [d / "zip.pth", d / "legacy.pth", tmp_path / "small.pth"]
    proc, lines = _run_child("fuzz", tmp_path, examples, *bases, timeout=900)
    current = tmp_path / "current.pth"
    assert proc.returncode == 0, (f"the reader failed (code {proc.returncode}); the case is kept at {current}: "
                                  f"{proc.stderr[-1500:]}")
    tried = next(line["tried"] for line in lines if "tried" in line)
    assert tried >= examples * 0.9
    _assert_peak(lines)
    return tried


def test_mutated_checkpoints_short(real, tmp_path):
    _fuzz(real, tmp_path, 300)


@pytest.mark.slow
def test_mutated_checkpoints_long(real, tmp_path):
    print("tried", _fuzz(real, tmp_path, 5000))
