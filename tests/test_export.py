"""Exported models compute what the eager model computes: TorchScript and the runtime backends
(onnxruntime, OpenVINO) for every family, ONNX of a whole detector at a fixed size for Faster
R-CNN, Mask R-CNN and FCOS, torch.export for the backbone + neck; and the export plumbing (cache,
missing packages, the command)."""
import copy
import json
import os
import subprocess
import sys
import textwrap
import weakref

import pytest
import torch

import hrnetdet
from calibrate import calibrate
from hrnetdet.cli import main
from hrnetdet.heads.masks import paste_masks
from hrnetdet.inference import match_detections, optimize_for_inference
from hrnetdet.inference import runtime
from hrnetdet.inference.export import export, export_onnx
from hrnetdet.inference.match import MIN_MATCHED
from hrnetdet.zoo.checkpoint import save_pretrained

FAMILIES = [f.name for f in hrnetdet.list_families()]
SMALL = dict(min_size=128, max_size=192)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def portrait(rocket):
    return rocket.transpose(1, 2).contiguous()  # 213 x 142: resized to 192 x 128, another padded size


def small_model(family: str, image: torch.Tensor):
    torch.manual_seed(0)
    kwargs = dict(SMALL)
    if family != "fcos":
        kwargs.update(rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=100)
    return calibrate(hrnetdet.create_model(f"{family}_hrnetv2p_w18", **kwargs), [image])


def assert_same_detections(ref, out):
    assert len(ref["scores"]) == 100  # calibrated weights, score threshold 0: a full top-100
    if "masks" in ref:
        assert out["masks"].shape == ref["masks"].shape
    stats = match_detections(ref, out)  # masks too, when both carry them
    assert stats["matched_frac"] >= MIN_MATCHED, stats


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """An HRNETDET_HOME whose exports folder is ``cache_dir``, for ``predict(backend=...)``."""
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def cache_dir(home):
    return str(home / "exports")


@pytest.fixture(scope="module")
def faster_rcnn(rocket):
    return small_model("faster_rcnn", rocket)


# The default run: onnxruntime for every family but the two heaviest exports (Cascade Mask R-CNN's
# and HTC's 13-15 graphs), OpenVINO for Faster and Mask R-CNN (from the same cached export).
DEFAULT_CASES = {("faster_rcnn", "openvino"), ("mask_rcnn", "openvino")} | {
    (f, "onnxruntime") for f in FAMILIES if f not in ("cascade_mask_rcnn", "htc")}
BACKEND_CASES = [(f, b) if (f, b) in DEFAULT_CASES else pytest.param(f, b, marks=pytest.mark.slow)
                 for b in ("onnxruntime", "openvino") for f in FAMILIES]


@pytest.mark.parametrize("family,backend", BACKEND_CASES)
def test_backend_matches_eager_at_two_new_sizes(family, backend, rocket, portrait, cache_dir, faster_rcnn):
    """Exported on a generated 480x640 image; compared on two others of other padded sizes."""
    pytest.importorskip(backend)
    model = faster_rcnn if family == "faster_rcnn" else small_model(family, rocket)
    fast = optimize_for_inference(copy.deepcopy(model), backend=backend, cache_dir=cache_dir)
    with torch.no_grad():
        for x in (rocket, portrait):
            assert_same_detections(model([x])[0], fast([x])[0])


def test_closing_releases_the_sessions_and_a_closed_model_refuses_to_run(faster_rcnn, rocket, cache_dir):
    pytest.importorskip("onnxruntime")
    fast = optimize_for_inference(copy.deepcopy(faster_rcnn), backend="onnxruntime", cache_dir=cache_dir)
    sessions = [weakref.ref(g.session) for g in fast.runtime.graphs.values()]
    assert len(sessions) == len(runtime.dense_parts(faster_rcnn)) == 4
    twin = copy.deepcopy(fast)  # sessions of its own
    fast.runtime.close()
    assert fast.runtime.closed and [s() for s in sessions] == [None] * 4  # released now, not at a later GC
    with pytest.raises(RuntimeError, match="^backbone: this model's onnxruntime sessions are closed; make it again"):
        fast([rocket])
    with torch.no_grad():
        assert_same_detections(faster_rcnn([rocket])[0], twin([rocket])[0])
    assert copy.deepcopy(fast).runtime.closed  # a closed model's copy is closed too


def test_a_with_block_closes_the_sessions(faster_rcnn, rocket, cache_dir):
    pytest.importorskip("openvino")
    fast = optimize_for_inference(copy.deepcopy(faster_rcnn), backend="openvino", cache_dir=cache_dir)
    with fast.runtime as session, torch.no_grad():
        assert session is fast.runtime and not session.closed
        assert_same_detections(faster_rcnn([rocket])[0], fast([rocket])[0])
    assert fast.runtime.closed
    with pytest.raises(RuntimeError, match="openvino sessions are closed"):
        fast([rocket])


def test_predict_reuses_one_session_per_model(faster_rcnn, rocket, home, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("HRNETDET_HOME", str(home))
    opened = []

    class Counted(runtime.RuntimeSession):
        def __init__(self, *args):
            super().__init__(*args)
            opened.append(self)

    monkeypatch.setattr(runtime, "RuntimeSession", Counted)
    first = hrnetdet.predict(faster_rcnn, rocket, score_thresh=0.0, backend="onnxruntime")
    second = hrnetdet.predict(faster_rcnn, rocket, score_thresh=0.0, backend="onnxruntime")
    assert len(opened) == 1 and not opened[0].closed
    torch.testing.assert_close(first["boxes"], second["boxes"])
    assert not hasattr(faster_rcnn, "runtime")  # the model itself stays eager
    runtime.close_runtime(faster_rcnn)
    assert opened[0].closed
    hrnetdet.predict(faster_rcnn, rocket, backend="onnxruntime")
    assert len(opened) == 2  # closed sessions are not reused
    runtime.close_runtime(faster_rcnn)


def test_openvino_sessions_leave_the_signal_stack_usable(faster_rcnn, rocket, cache_dir, tmp_path):
    """OpenVINO's CPU plugin swaps the thread's alternate signal stack. With one plugin per graph,
    freed first-made first, the thread was left on an unmapped stack, and the next signal that
    Python handles (a DataLoader worker's SIGCHLD) killed the process: the crash that once split
    the test suite into two processes. Run in a child, so that a crash fails only this test."""
    pytest.importorskip("openvino")
    folder = runtime.cached_export(faster_rcnn, cache_dir)
    torch.save(rocket, tmp_path / "rocket.pt")
    script = textwrap.dedent(f"""
        import copy, ctypes, gc, os, signal, torch, hrnetdet
        from hrnetdet.inference import runtime

        class Stack(ctypes.Structure):
            _fields_ = [("sp", ctypes.c_void_p), ("flags", ctypes.c_int), ("size", ctypes.c_size_t)]

        def signal_stack():
            stack = Stack()
            ctypes.CDLL(None).sigaltstack(None, ctypes.byref(stack))
            return stack.sp

        before = signal_stack()
        model = hrnetdet.create_model("faster_rcnn_hrnetv2p_w18", min_size=128, max_size=192)
        fast = [runtime.attach(copy.deepcopy(model), {folder!r}, "openvino") for _ in range(2)]
        runtime.attach(fast[1], {folder!r}, "openvino")  # its sessions replaced
        image = torch.load({str(tmp_path / "rocket.pt")!r})
        with torch.no_grad():
            [m([image]) for m in fast]  # no loop variable keeps a model alive
        during = signal_stack()
        while fast:
            fast.pop(0)  # freed first-made first
        gc.collect()
        print(signal_stack() in (before, during))  # not a stack that was freed
        signal.signal(signal.SIGUSR1, lambda *args: print("handled"))
        os.kill(os.getpid(), signal.SIGUSR1)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert (done.returncode, done.stdout.split()) == (0, ["True", "handled"]), done.stderr[-2000:]


@pytest.mark.parametrize("family", FAMILIES)
def test_torchscript_matches_eager(family, rocket):
    model = small_model(family, rocket)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        ref = model([rocket])[0]
        out = scripted([rocket])
    out = out[1] if isinstance(out, tuple) else out  # GeneralizedRCNN returns (losses, detections)
    assert_same_detections(ref, out[0])


@pytest.mark.parametrize("family", ["faster_rcnn", "mask_rcnn", "fcos"])
def test_whole_detector_onnx_matches_eager(family, rocket, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = small_model(family, rocket)
    with torch.no_grad():
        ref = model([rocket])[0]
    path = str(tmp_path / "model.onnx")
    names = export_onnx(model, path, batch_size=1, image_size=tuple(rocket.shape[-2:]))
    assert model.transform.paste  # restored after tracing
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    outs = session.run(None, {"images": rocket[None].numpy()})
    got = {n.rsplit("_", 1)[0]: torch.from_numpy(o) for n, o in zip(names, outs)}
    if "masks" in got:  # exported unpasted, in each box's frame
        assert got["masks"].shape[-2:] == (28, 28)
        got["masks"] = paste_masks(got["masks"], got["boxes"], *rocket.shape[-2:], model.transform.mask_thresh)
    assert_same_detections(ref, got)


def test_backbone_torch_export_any_size(rocket):
    model = small_model("faster_rcnn", rocket)
    x = torch.rand(1, 3, 160, 224)
    with torch.no_grad():
        ref = model.backbone(x)
        out = torch.export.export(model.backbone, (x,)).module()(x)
    for k, r in ref.items():
        torch.testing.assert_close(out[k], r, rtol=1e-5, atol=1e-5 * float(r.abs().max()))


@pytest.mark.parametrize("fmt,dynamic", [("onnx", True), pytest.param("onnx", False, marks=pytest.mark.slow),
                                         pytest.param("openvino", True, marks=pytest.mark.slow),
                                         pytest.param("torchscript", False, marks=pytest.mark.slow)])
def test_export_function_checks_two_sizes(fmt, dynamic, tmp_path, capsys):
    pytest.importorskip("onnxruntime" if fmt == "onnx" else "openvino" if fmt == "openvino" else "torch")
    # calibrated on the generated image the check uses: on images unlike its calibration image a
    # random model returns degenerate border boxes whose IoU float noise decides
    model = small_model("faster_rcnn", runtime.generated_image(480, 640, seed=1))
    stats = export(model, str(tmp_path), fmt, dynamic=dynamic)
    assert len(stats) == 2 and all(s["n_ref"] == 100 and s["matched_frac"] >= MIN_MATCHED for s in stats)
    assert capsys.readouterr().out.count("of eager's 100 detections matched") == 2
    files = sorted(os.listdir(tmp_path))
    assert not [f for f in files if f.startswith(".export.")]  # the temporary folder is gone
    assert {"config.json", "model.safetensors"} <= set(files)  # the folder names the model too
    if fmt == "torchscript":
        assert files == ["config.json", "model.pt", "model.safetensors"]
    else:
        manifest = json.loads((tmp_path / "export.json").read_text())
        assert set(manifest["parts"]) == set(runtime.dense_parts(model))
        assert all(os.path.exists(tmp_path / e["file"]) for e in manifest["parts"].values())


def test_static_graph_rejects_another_size(rocket, portrait, tmp_path):
    pytest.importorskip("onnxruntime")
    model = small_model("faster_rcnn", rocket)
    export(model, str(tmp_path), "onnx", dynamic=False, check=False)
    static = runtime.attach(copy.deepcopy(model), str(tmp_path), "onnxruntime")
    with pytest.raises(Exception, match="input_0"):
        static([portrait])


def test_export_command(rocket, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    model = small_model("faster_rcnn", rocket)
    save_pretrained(model, str(tmp_path / "ckpt"))
    ckpt = tmp_path / "ckpt" / "model.safetensors"
    out = tmp_path / "out"
    assert main(["export", "faster_rcnn_hrnetv2p_w18", "--checkpoint", str(ckpt), "--format", "onnx",
                 "--out", str(out), "--dynamic", "--min-size", "128", "--max-size", "192"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("check against eager") == 2 and (out / "export.json").exists()
    rebuilt = hrnetdet.create_model(str(out))  # an exported folder names its model, as --model OUT does
    assert rebuilt.settings.min_size == (128,) and rebuilt.settings.max_size == 192
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in rebuilt.state_dict().items())
    with pytest.raises(SystemExit, match="half"):
        main(["export", "faster_rcnn_hrnetv2p_w18", "--checkpoint", str(ckpt), "--format", "onnx",
              "--out", str(out), "--half"])


def test_runtime_export_is_cached_per_weights(tmp_path, monkeypatch):
    """One export per weights and settings; other weights, another export."""
    calls = []

    def fake_export(model, img, out_dir, **kwargs):
        calls.append(out_dir)
        with open(os.path.join(out_dir, runtime.MANIFEST), "w") as f:
            json.dump({"parts": {}}, f)

    monkeypatch.setattr(runtime, "export_parts", fake_export)
    model = hrnetdet.create_model("faster_rcnn_hrnetv2p_w18")
    first = runtime.cached_export(model, str(tmp_path))
    assert runtime.cached_export(copy.deepcopy(model), str(tmp_path)) == first and len(calls) == 1
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.bias[0] += 1
    assert runtime.cached_export(model, str(tmp_path)) != first and len(calls) == 2
    assert len(os.listdir(tmp_path)) == 2  # the two exports, no temporary folder


def test_runtime_export_survives_a_concurrent_writer(tmp_path, monkeypatch):
    """Another process renames its finished export into place while this one exports: this one
    returns that folder, keeps it intact and leaves no temporary folder behind."""
    model = hrnetdet.create_model("faster_rcnn_hrnetv2p_w18")
    final = os.path.join(tmp_path, runtime.cache_key(model))

    def racing_export(model, img, out_dir, **kwargs):
        os.makedirs(final)
        with open(os.path.join(final, runtime.MANIFEST), "w") as f:
            f.write('{"parts": {}, "writer": "other"}')
        with open(os.path.join(out_dir, runtime.MANIFEST), "w") as f:
            f.write('{"parts": {}, "writer": "this"}')

    monkeypatch.setattr(runtime, "export_parts", racing_export)
    assert runtime.cached_export(model, str(tmp_path)) == final
    assert json.loads(open(os.path.join(final, runtime.MANIFEST)).read())["writer"] == "other"
    assert os.listdir(tmp_path) == [os.path.basename(final)]


@pytest.mark.parametrize("backend,extra", [("onnxruntime", "onnx"), ("openvino", "openvino")])
def test_missing_backend_names_the_extra(backend, extra, monkeypatch):
    monkeypatch.setitem(sys.modules, backend, None)  # importing it now raises ImportError
    model = hrnetdet.create_model("faster_rcnn_hrnetv2p_w18")
    with pytest.raises(ImportError, match=rf"hrnetdet\[{extra}\]"):
        optimize_for_inference(model, backend=backend)
    with pytest.raises(ValueError, match="backend"):
        optimize_for_inference(model, backend="tensorrt")


def test_match_detections_identical_empty_boxes_and_masks():
    """Zero-area boxes (clipped at the border) that agree exactly are a match; masks must overlap
    with IoU >= the default criterion."""
    boxes = torch.tensor([[10.0, 300.0, 20.0, 300.0], [0.0, 0.0, 10.0, 10.0]])
    ref = {"boxes": boxes, "labels": torch.tensor([1, 2]), "scores": torch.tensor([0.9, 0.8])}
    assert match_detections(ref, dict(ref))["n_matched"] == 2
    masks = torch.zeros(2, 1, 20, 20)
    masks[:, :, :10, :10] = 1
    other = masks.clone()
    other[1, :, :10, 9] = 0  # 90 of 100 pixels: IoU 0.90, still a match
    assert match_detections({**ref, "masks": masks}, {**ref, "masks": other})["n_matched"] == 2
    other[1, :, :10, 8] = 0  # IoU 0.80: no longer
    assert match_detections({**ref, "masks": masks}, {**ref, "masks": other})["n_matched"] == 1
