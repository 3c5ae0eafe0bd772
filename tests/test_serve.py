"""``hrnetdet serve`` against real servers: subprocesses on 127.0.0.1 and a free port, one per
model family for the module (a start costs seconds), always stopped. Tiny calibrated W18 models on
small images; the answers are compared with ``hrnetdet.predict`` in this process. 95 s on the
2-core machine at load average 10: the two calibrations and the servers' starts (spawned workers
importing torch) take half of it."""
import base64
import concurrent.futures
import http.client
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pytest
import torch

pytest.importorskip("litserve")
jsonschema = pytest.importorskip("jsonschema")

import hrnetdet  # noqa: E402
from conftest import PREDICT_SMALL  # noqa: E402
from hrnetdet.cli import main  # noqa: E402
from hrnetdet.inference.options import PredictOptions  # noqa: E402
from hrnetdet.serve.client import Client, RemoteError, as_result  # noqa: E402
from hrnetdet.serve.requests import RequestError, merge_options, parse_body, parse_options  # noqa: E402
from hrnetdet.serve.responses import response_schema  # noqa: E402

KEY = "k3y-for-tests"
START_S = 180  # a server's start on a loaded 2-core machine: spawn, import torch, build the model
CALL_S = 120
UPLOAD_MB = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, path: str, data: Optional[bytes] = None, headers: Optional[Dict[str, str]] = None,
         method: Optional[str] = None) -> Tuple[int, bytes, Dict[str, str]]:
    """(status, body, headers) of one request; HTTP errors are answers too."""
    request = urllib.request.Request(url + path, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=CALL_S) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


class Server:
    """``hrnetdet serve`` in a subprocess, up when ``/health`` answers 200."""

    def __init__(self, folder: str, log_path: str, *flags: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "wb")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "hrnetdet.cli", "serve", folder, "--port", str(self.port),
                                      "--threads", "1", *flags], stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait_until_up(self) -> None:
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"the server stopped while starting:\n{self.output()}")
            try:
                if call(self.url, "/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        pytest.fail(f"the server did not answer /health in {START_S} s:\n{self.output()}")

    def output(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")[-3000:]

    def tree(self) -> List[int]:
        """The server's process and its descendants (workers, LitServe's manager)."""
        pids, i = [self.proc.pid], 0
        while i < len(pids):
            try:
                with open(f"/proc/{pids[i]}/task/{pids[i]}/children") as f:
                    pids += [int(p) for p in f.read().split()]
            except OSError:
                pass
            i += 1
        return pids

    def rss_bytes(self) -> int:
        total = 0
        for pid in self.tree():
            try:
                with open(f"/proc/{pid}/status") as f:
                    total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
            except (OSError, StopIteration):
                pass
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                for pid in reversed(self.tree()):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
                self.proc.wait(timeout=10)
        self.log.close()


def blocky(seed: int, rows: int, cols: int) -> np.ndarray:
    """An image of 12-pixel blocks (structure the calibrated models detect in)."""
    base = np.random.default_rng(seed).integers(0, 256, (rows, cols, 3), dtype=np.uint8)
    return np.kron(base, np.ones((12, 12, 1), dtype=np.uint8))


def encoded(array: np.ndarray, fmt: str) -> bytes:
    from PIL import Image
    out = io.BytesIO()
    Image.fromarray(array).save(out, format=fmt)
    return out.getvalue()


@pytest.fixture(scope="module")
def images(tmp_path_factory, rgb) -> Dict[str, str]:
    """Image files: the conftest image as PNG and JPEG, and two more of another size."""
    folder = tmp_path_factory.mktemp("images")
    files = {"a.png": (rgb, "PNG"), "a.jpg": (rgb, "JPEG"), "b.png": (blocky(1, 8, 6), "PNG"),
             "c.jpg": (blocky(2, 8, 6), "JPEG")}
    paths = {}
    for name, (array, fmt) in files.items():
        (folder / name).write_bytes(encoded(array, fmt))
        paths[name] = str(folder / name)
    return paths


DETECTIONS = 20  # per image: a mask model's time goes into its masks


@pytest.fixture(scope="module")
def mask_folder(model, tmp_path_factory) -> str:
    """conftest's calibrated Mask R-CNN with its best 20 detections, saved (model.safetensors and config.json)."""
    from hrnetdet.zoo.checkpoint import save_pretrained
    folder = tmp_path_factory.mktemp("mask")
    with hrnetdet.temporary_settings(model, detections_per_img=DETECTIONS):
        save_pretrained(model, str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def box_folder(rgb, tmp_path_factory) -> str:
    from calibrate import calibrate
    from hrnetdet.inference import load_image
    from hrnetdet.zoo.checkpoint import save_pretrained
    torch.manual_seed(0)
    model = calibrate(hrnetdet.create_model("faster_rcnn_hrnetv2p_w18", **PREDICT_SMALL,
                                            box_detections_per_img=DETECTIONS), [load_image(rgb)])
    folder = tmp_path_factory.mktemp("box")
    save_pretrained(model, str(folder))
    return str(folder)


MASK_FLAGS = ("--api-key", KEY, "--max-upload-mb", str(UPLOAD_MB))


@pytest.fixture(scope="module")
def servers(mask_folder, box_folder, tmp_path_factory):
    """The module's two servers, started together (each start costs seconds), always stopped.
    mask: batch 1, an API key, a 1 MB upload limit; box: dynamic batching, up to 8 requests
    and 50 ms to fill a batch."""
    logs = tmp_path_factory.mktemp("logs")
    started = {}
    try:
        started["mask"] = Server(mask_folder, str(logs / "mask.log"), *MASK_FLAGS)
        started["box"] = Server(box_folder, str(logs / "box.log"), "--max-batch-size", "8", "--batch-timeout", "0.05")
        for server in started.values():
            server.wait_until_up()
        yield started
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture
def mask_server(servers, mask_folder, tmp_path):
    """The module's mask server, started again if a test before stopped it (the SIGTERM test):
    the tests pass in any order."""
    if servers["mask"].proc.poll() is not None:
        servers["mask"].stop()  # closes its log
        servers["mask"] = Server(mask_folder, str(tmp_path / "mask.log"), *MASK_FLAGS)
        servers["mask"].wait_until_up()
    return servers["mask"]


@pytest.fixture(scope="module")
def box_server(servers):
    return servers["box"]


def assert_same(remote: Dict[str, Any], local: Dict[str, Any]) -> None:
    """The API's promise against hrnetdet.predict: boxes within 1e-3 px, labels equal, scores
    within 1e-5, masks the same pixels."""
    assert len(local["scores"]) > 0
    assert torch.equal(remote["labels"], local["labels"])
    assert torch.allclose(remote["boxes"], local["boxes"], rtol=0, atol=1e-3)
    assert torch.allclose(remote["scores"], local["scores"], rtol=0, atol=1e-5)
    assert remote["names"] == local["names"]
    assert ("masks" in remote) == ("masks" in local)
    if "masks" in local:
        assert torch.equal(remote["masks"], local["masks"])


def valid(record: Dict[str, Any]) -> Dict[str, Any]:
    jsonschema.validate(record, response_schema())
    scores = [d["score"] for d in record["detections"]]
    assert scores == sorted(scores, reverse=True)
    return record


@pytest.mark.parametrize("family", ["mask", "box"])
def test_api_answers_what_predict_answers(family, request, images):
    server = request.getfixturevalue(f"{family}_server")
    model = hrnetdet.create_model(request.getfixturevalue(f"{family}_folder"))
    client = Client(server.url, api_key=KEY if family == "mask" else None)
    for name in ("a.png", "b.png"):
        assert_same(client.predict(images[name]), hrnetdet.predict(model, images[name]))
    record = valid(client.predict_record(images["a.jpg"]))  # the JSON itself, checked against the schema
    assert all(("mask" in d) == (family == "mask") for d in record["detections"])
    assert {d["category_id"] for d in record["detections"]} <= set(client.info()["category_ids"])
    assert_same(as_result(record, family == "mask"), hrnetdet.predict(model, images["a.jpg"]))
    if family == "box":  # in-memory images travel as lossless PNGs; a list answers a list, in order
        array = request.getfixturevalue("rgb")
        both = client.predict([images["b.png"], array])
        assert [r["input_index"] for r in both] == [0, 1] and both[0]["file_name"] == images["b.png"]
        assert_same(both[1], hrnetdet.predict(model, array))
    local = hrnetdet.predict(model, images["a.png"], score_thresh=0.016, max_det=5)
    assert_same(client.predict(images["a.png"], score_thresh=0.016, max_det=5), local)
    assert len(local["scores"]) <= 5


def test_multipart_and_base64_json_bodies_answer_as_a_raw_body(mask_server, images):
    data = open(images["a.jpg"], "rb").read()
    key = {"X-API-Key": KEY}
    raw = call(mask_server.url, "/predict?max_det=3", data, {**key, "Content-Type": "image/jpeg"})
    boundary = "hrnetdet-test-boundary"
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + (
            f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"max_det\"\r\n\r\n3\r\n"
            f"--{boundary}--\r\n").encode()
    multipart = call(mask_server.url, "/predict", form, {**key, "Content-Type": f"multipart/form-data; boundary={boundary}"})
    as_json = call(mask_server.url, "/predict", json.dumps({"image": base64.b64encode(data).decode(), "max_det": 3}).encode(),
                   {**key, "Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert raw[0] == multipart[0] == as_json[0] == 200
    assert json.loads(raw[1]) == json.loads(multipart[1]) == json.loads(as_json[1])
    assert len(valid(json.loads(raw[1]))["detections"]) == 3


def test_32_concurrent_requests_each_answered_as_alone(box_server, images):
    client = Client(box_server.url)
    names = ["a.png", "b.png", "a.jpg", "c.jpg"]
    alone = {name: client.predict(images[name]) for name in names}
    order = [names[i % len(names)] for i in range(32)]
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda name: client.predict(images[name]), order, timeout=CALL_S))
    for name, answer in zip(order, answers):
        assert_same(answer, alone[name])
    metrics = call(box_server.url, "/metrics")[1].decode()
    runs = int(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("hrnetdet_batch_size_count")))
    singles = int(next(line.split()[-1] for line in metrics.splitlines()
                       if line.startswith('hrnetdet_batch_size_bucket{le="1"}')))
    assert runs > singles  # some requests did run batched


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels (and holds almost nothing)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def bad_requests(jpeg: bytes) -> List[Tuple[str, str, bytes, Dict[str, str], int, str]]:
    """(case, path, body, headers, status, words the message must hold)."""
    key = {"X-API-Key": KEY}
    raw = {**key, "Content-Type": "image/jpeg"}
    return [
        ("not an image", "/predict", b"hello, not an image", raw, 400, "not an image file"),
        ("empty body", "/predict", b"", raw, 400, "empty"),
        ("truncated JPEG", "/predict", jpeg[: len(jpeg) // 2], raw, 400, "cannot read"),
        ("header claims 100000x100000", "/predict", png_claiming(100000, 100000),
         {**key, "Content-Type": "image/png"}, 413, "megapixels"),
        ("wrong content type", "/predict", jpeg, {**key, "Content-Type": "text/plain"}, 415, "text/plain"),
        ("no content type", "/predict", jpeg, {**key, "Content-Type": ""}, 415, "without a content type"),
        ("score_thresh 2", "/predict?score_thresh=2", jpeg, raw, 400, "score_thresh"),
        ("score_thresh abc", "/predict?score_thresh=abc", jpeg, raw, 400, "score_thresh"),
        ("max_det 0", "/predict?max_det=0", jpeg, raw, 400, "max_det"),
        ("masks png", "/predict?masks=png", jpeg, raw, 400, "masks"),
        ("tta maybe", "/predict?tta=maybe", jpeg, raw, 400, "tta"),
        ("slice -1", "/predict?slice=-1", jpeg, raw, 400, "slice"),
        ("overlap 1", "/predict?slice=64&overlap=1", jpeg, raw, 400, "overlap"),
        ("unknown option", "/predict?colour=red", jpeg, raw, 400, "colour"),
        ("JSON without image", "/predict", b'{"score_thresh": 0.5}', {**key, "Content-Type": "application/json"},
         400, "'image'"),
        ("JSON bad base64", "/predict", b'{"image": "not base64!"}', {**key, "Content-Type": "application/json"},
         400, "base64"),
        ("JSON option clash", "/predict?max_det=2", json.dumps({"image": base64.b64encode(jpeg).decode(),
                                                               "max_det": 3}).encode(),
         {**key, "Content-Type": "application/json"}, 400, "max_det"),
        ("missing key", "/predict", jpeg, {"Content-Type": "image/jpeg"}, 401, "API key"),
        ("wrong key", "/predict", jpeg, {"X-API-Key": "wrong", "Content-Type": "image/jpeg"}, 401, "wrong API key"),
        ("wrong bearer", "/info", None, {"Authorization": "Bearer wrong"}, 401, "wrong API key"),
    ]


def test_every_bad_input_gets_its_status_and_message_and_the_server_goes_on(mask_server, images):
    jpeg = open(images["a.jpg"], "rb").read()
    for case, path, body, headers, status, words in bad_requests(jpeg):
        got, text, response_headers = call(mask_server.url, path, body, headers,
                                           method="GET" if body is None else "POST")
        assert got == status, (case, text)
        assert response_headers["content-type"] == "application/json", case
        message = json.loads(text)["error"]
        assert words in message and "\n" not in message and " at 0x" not in message, (case, message)
        assert call(mask_server.url, "/health")[0] == 200, case
    assert call(mask_server.url, "/predict", jpeg, {"X-API-Key": KEY, "Content-Type": "image/jpeg"})[0] == 200


def test_a_body_declared_over_the_limit_is_refused_before_it_is_sent(mask_server):
    """Content-Length over --max-upload-mb: 413 from the headers alone (the body never follows)."""
    connection = http.client.HTTPConnection("127.0.0.1", mask_server.port, timeout=CALL_S)
    try:
        connection.putrequest("POST", "/predict")
        for name, value in (("X-API-Key", KEY), ("Content-Type", "image/jpeg"),
                            ("Content-Length", str(UPLOAD_MB * 2 ** 20 + 1))):
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        assert response.status == 413
        assert "over the limit of 1048576 bytes" in json.loads(response.read())["error"]
    finally:
        connection.close()
    assert call(mask_server.url, "/health")[0] == 200


def refusals_413(server: Server) -> int:
    text = call(server.url, "/metrics", headers={"X-API-Key": KEY})[1].decode()
    line = 'hrnetdet_requests_total{route="/predict",status="413"} '
    return next((int(x[len(line):]) for x in text.splitlines() if x.startswith(line)), 0)


def test_a_body_without_length_is_cut_at_the_limit(mask_server):
    """A chunked body (no Content-Length) is refused once past the limit, not read whole."""
    before = refusals_413(mask_server)
    connection = http.client.HTTPConnection("127.0.0.1", mask_server.port, timeout=CALL_S)
    chunks = (bytes(64 * 1024) for _ in range(UPLOAD_MB * 16 + 8))
    try:
        connection.request("POST", "/predict", body=chunks, encode_chunked=True,
                           headers={"X-API-Key": KEY, "Content-Type": "image/jpeg"})
        response = connection.getresponse()
        assert response.status == 413
        assert "over the limit" in json.loads(response.read())["error"]
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed while the body was still coming: refused before the end
    finally:
        connection.close()
    assert call(mask_server.url, "/health")[0] == 200
    assert refusals_413(mask_server) == before + 1


def test_500_bad_requests_grow_the_server_by_under_10_percent(mask_server, images):
    jpeg = open(images["a.jpg"], "rb").read()
    cases = bad_requests(jpeg)
    for case in cases * 2:  # warm: the first of each kind loads code and caches
        call(mask_server.url, case[1], case[2], case[3], method="GET" if case[2] is None else "POST")
    before = mask_server.rss_bytes()
    for i in range(500):
        case = cases[i % len(cases)]
        assert call(mask_server.url, case[1], case[2], case[3],
                    method="GET" if case[2] is None else "POST")[0] == case[4]
    after = mask_server.rss_bytes()
    print(f"server RSS {before / 2 ** 20:.1f} MB -> {after / 2 ** 20:.1f} MB after 500 bad requests")
    assert after < 1.10 * before
    assert call(mask_server.url, "/health")[0] == 200


def test_info_metrics_and_page(mask_server, images):
    jpeg = open(images["a.jpg"], "rb").read()
    assert call(mask_server.url, "/predict", jpeg, {"X-API-Key": KEY, "Content-Type": "image/jpeg"})[0] == 200
    assert call(mask_server.url, "/predict", jpeg, {"Content-Type": "image/jpeg"})[0] == 401
    assert call(mask_server.url, "/info")[0] == 401
    status, body, _ = call(mask_server.url, "/info", headers={"X-API-Key": KEY})
    info = json.loads(body)
    assert status == 200 and info["model"] == "mask_rcnn_hrnetv2p_w18" and info["masks"] is True
    assert info["family"] == "mask_rcnn" and info["categories"][0] == "person" and info["category_ids"][0] == 1
    assert info["input"]["max_upload_mb"] == UPLOAD_MB and info["input"]["max_pixels"] == 64_000_000
    assert info["backend"] == "torch" and info["version"] == hrnetdet.__version__
    assert json.loads(call(mask_server.url, "/health")[1]) == {"status": "ok"}
    status, body, headers = call(mask_server.url, "/metrics", headers={"X-API-Key": KEY})
    text = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert 'hrnetdet_requests_total{route="/predict",status="200"}' in text
    assert 'hrnetdet_requests_total{route="/predict",status="401"}' in text
    assert "# TYPE hrnetdet_request_latency_seconds histogram" in text and "hrnetdet_batch_size_count" in text
    status, body, headers = call(mask_server.url, "/")
    if os.path.isfile(os.path.join(os.path.dirname(hrnetdet.__file__), "serve", "static", "index.html")):
        assert status == 200 and headers["content-type"].startswith("text/html")
    else:
        assert status == 404 and "no web page" in json.loads(body)["error"]
    status, body, _ = call(mask_server.url, "/static/nothing-here.js")  # the page's assets need no key
    assert status == 404 and "error" in json.loads(body)
    assert call(mask_server.url, "/nowhere")[0] == 401  # with a key, even a wrong route needs it
    status, body, _ = call(mask_server.url, "/nowhere", headers={"X-API-Key": KEY})
    assert status == 404 and json.loads(body) == {"error": "not found: /nowhere"}


def test_predict_with_server_writes_the_files_of_a_local_run(mask_server, mask_folder, images, tmp_path, monkeypatch):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("a.png", "b.png"):
        (inputs / name).write_bytes(open(images[name], "rb").read())
    (inputs / "bad.jpg").write_bytes(b"not a picture")
    monkeypatch.setenv("HRNETDET_API_KEY", KEY)
    seen = Client(mask_server.url, api_key=KEY).predict(images["a.png"])["names"]
    flags = ["--score-thresh", "0.01", "--classes", *sorted(set(seen[:20]))[:2], "--max-det", "7"]
    assert main(["predict", str(inputs), "--model", mask_folder, "--out", str(tmp_path / "local"), *flags]) == 0
    assert main(["predict", str(inputs), "--server", mask_server.url, "--out", str(tmp_path / "remote"), *flags]) == 0
    for name in ("results.json", "failed.txt", "a.jpg", "b.jpg"):
        assert (tmp_path / "local" / name).read_bytes() == (tmp_path / "remote" / name).read_bytes(), name
    assert len(json.loads((tmp_path / "local" / "results.json").read_text())) > 2  # not two empty runs


def test_requests_are_checked_without_a_server():
    base = PredictOptions()
    assert parse_options({"score_thresh": "0.25", "max_det": "4", "tta": "true"}, base, True).options == \
        base.replace(score_thresh=0.25, max_det=4, tta=True, mask_format="rle")
    assert parse_options({"masks": "none"}, base, True).masks is False
    assert parse_options({}, base, False).masks is False  # a box model sends no masks
    assert parse_options({"slice": "0"}, base, True).options.slice is None
    with pytest.raises(RequestError, match="tta does not combine with slice") as e:
        parse_options({"slice": 64, "tta": True}, base, True)
    assert e.value.status == 400
    with pytest.raises(RequestError, match="both in the query string and in the body"):
        merge_options({"max_det": "2"}, {"max_det": 3})
    upload = parse_body("multipart/form-data; boundary=xyz", b'--xyz\r\nContent-Disposition: form-data; name="image"; '
                        b'filename="x.png"\r\n\r\n\x89PNG...\r\n--xyz\r\nContent-Disposition: form-data; '
                        b'name="score_thresh"\r\n\r\n0.5\r\n--xyz--\r\n')
    assert upload.data == b"\x89PNG..." and upload.options == {"score_thresh": "0.5"}
    with pytest.raises(RequestError, match="no file field 'image'"):
        parse_body("multipart/form-data; boundary=xyz", b'--xyz\r\nContent-Disposition: form-data; name="a"\r\n\r\n1'
                   b'\r\n--xyz--\r\n')


def test_client_raises_the_servers_refusal(mask_server):
    assert hrnetdet.Client is Client
    with pytest.raises(RemoteError, match="API key") as e:
        Client(mask_server.url, api_key="").predict(b"\xff\xd8\xff")
    assert e.value.status == 401
    with pytest.raises(RemoteError, match="not an image") as e:
        Client(mask_server.url, api_key=KEY).predict(b"no image here")
    assert e.value.status == 400
    with pytest.raises(ConnectionError, match="cannot reach"):
        Client(f"http://127.0.0.1:{free_port()}").health()


@pytest.mark.parametrize("argv, message", [
    (["predict", "x.jpg", "--server", "http://127.0.0.1:1", "--model", "faster_rcnn_hrnetv2p_w18"],
     "--server runs the server's model: leave out --model"),
    (["predict", "x.jpg", "--server", "http://127.0.0.1:1", "--engine", "ray"], "--server and --engine ray: choose one"),
    (["predict", "x.jpg"], "required: --model (or --server URL)"),
    (["serve", "faster_rcnn_hrnetv2p_w18"], "give --checkpoint-path PATH, --pretrained"),
    (["serve", "x", "--max-upload-mb", "0"], "argument --max-upload-mb: a number above 0, got '0'"),
    (["predict", "x.jpg", "--server", "http://127.0.0.1:1", "--int8", "--calibration", "cal"],
     "--int8: a server's model is quantized where it runs"),
    (["serve", "faster_rcnn_hrnetv2p_w18", "--pretrained", "--int8", "--calibration", "cal"],
     "--int8 runs in a runtime: add --backend"),
])
def test_cli_refuses_flags_that_cannot_run(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_serve_without_litserve_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "litserve", None)
    with pytest.raises(SystemExit, match=r"pip install 'hrnetdet\[serve\]'"):
        main(["serve", "faster_rcnn_hrnetv2p_w18", "--pretrained"])


def test_sigterm_lets_requests_in_flight_finish(mask_server, images):
    """It stops the module's mask server (the fixture starts another for a test after it). Four requests queue behind one another (batch 1);
    SIGTERM after the first answer: the others still get theirs, then the server exits 0."""
    client = Client(mask_server.url, api_key=KEY)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client.predict_record, images["b.png"]) for _ in range(4)]
        done, _ = concurrent.futures.wait(futures, timeout=CALL_S, return_when=concurrent.futures.FIRST_COMPLETED)
        in_flight = sum(not f.done() for f in futures)
        assert done and in_flight > 0
        mask_server.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        answers = [f.result(timeout=CALL_S) for f in futures]
        last = time.monotonic()
    assert all(valid(a)["detections"] for a in answers)
    assert mask_server.proc.wait(timeout=60) == 0
    print(f"SIGTERM: {in_flight} requests in flight answered, the last "
          f"{last - signalled:.2f} s after the signal; exit code 0")
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", mask_server.port), timeout=5).close()
