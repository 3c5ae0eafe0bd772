"""``hrnetdet serve`` under load on loopback, beside ``hrnetdet.predict`` on the same images in the
same run, and the cost of masks in a response:

- the server with no batching (``--max-batch-size 1``) and with dynamic batching (``--max-batch-size
  8``), each at 1 and at 8 concurrent clients (a connection each, raw JPEG bodies, every answer
  checked to be a 200 with detections): requests/s and p50/p95/p99 latency;
- beside each, in the same rounds (a round of the server, a round in-process, as many images each as
  there are clients, so that a shared machine's load falls on both alike), in-process
  ``hrnetdet.predict`` on the same files: one image per call at concurrency 1, ``batch_size=8`` at 8;
- a 100-detection mask response as the server writes it: its JSON size and encode time with masks as
  COCO RLE against the naive full-mask JSON lists.

    python benchmarks/serve.py [--size 256] [--requests 16] [--threads 1] [--out benchmarks/serve.md]

W18 Faster R-CNN, random weights calibrated (tools/calibrate.py) so that every image carries a full
set of detections, as a trained model's would; the same thread count for the server and in-process.
"""
import argparse
import http.client
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from typing import Dict, List, Sequence

import numpy as np
import torch
from PIL import Image

import hrnetdet
from hrnetdet.data.results import mask_rle
from hrnetdet.serve.responses import predict_response
from hrnetdet.zoo.checkpoint import save_pretrained

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
from calibrate import calibrate  # noqa: E402  (a maintainer helper, not installed)

ARCH = "faster_rcnn_hrnetv2p_w18"
TARGET_LATENCY = 1.05  # the server's p50 at concurrency 1, at most this times in-process predict's
TARGET_THROUGHPUT = 0.95  # the server's requests/s at concurrency 8, at least this times batched predict's


def make_images(folder: str, n: int, size: int) -> List[str]:
    """``n`` size x size JPEGs of coloured blocks, each a different shift of one pattern."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)
    block = -(-size // 10)
    paths = []
    for i in range(n):
        image = np.kron(np.roll(base, i, axis=(0, 1)), np.ones((block, block, 1), np.uint8))[:size, :size]
        paths.append(os.path.join(folder, f"{i:03d}.jpg"))
        Image.fromarray(image).save(paths[-1], quality=90)
    return paths


def make_model(paths: Sequence[str], size: int) -> torch.nn.Module:
    from hrnetdet.inference import load_image
    torch.manual_seed(0)
    model = hrnetdet.create_model(ARCH, min_size=size, max_size=size)
    return calibrate(model, [load_image(p) for p in paths[:2]])


def percentiles(seconds: Sequence[float]) -> Dict[str, float]:
    p50, p95, p99 = np.percentile(np.asarray(seconds) * 1e3, [50, 95, 99])
    return {"p50": p50, "p95": p95, "p99": p99}


def in_process(model: torch.nn.Module, paths: Sequence[str]) -> "tuple[List[float], float]":
    """``hrnetdet.predict`` on files (decoding included, as the server's requests include it): one
    call per image when ``paths`` holds one, else one call with ``batch_size=len(paths)``. Each
    image's latency (its call's time) and the call's wall time."""
    t = time.perf_counter()
    results = hrnetdet.predict(model, list(paths), batch_size=len(paths), num_workers=0)
    wall = time.perf_counter() - t
    assert all(len(r["scores"]) for r in results)
    return [wall] * len(paths), wall


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``hrnetdet serve`` in a child process on 127.0.0.1, stopped on exit."""

    def __init__(self, folder: str, threads: int, max_batch_size: int, batch_timeout: float):
        self.port = free_port()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        env.pop("HRNETDET_API_KEY", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hrnetdet.cli", "serve", folder, "--threads", str(threads), "--host", "127.0.0.1",
             "--port", str(self.port), "--max-batch-size", str(max_batch_size), "--batch-timeout", str(batch_timeout)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def __enter__(self) -> "Server":
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited with {self.proc.returncode}: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        raise SystemExit("the server did not answer /health within 300 s")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def post(connection: http.client.HTTPConnection, body: bytes) -> float:
    """One raw-JPEG request on a kept-alive connection; its latency. Refuses anything but a 200
    with detections."""
    t = time.perf_counter()
    connection.request("POST", "/predict", body=body, headers={"Content-Type": "image/jpeg"})
    response = connection.getresponse()
    data = response.read()
    seconds = time.perf_counter() - t
    if response.status != 200 or not json.loads(data)["detections"]:
        raise SystemExit(f"the server answered {response.status}: {data[:300]!r}")
    return seconds


def load(port: int, bodies: Sequence[bytes], concurrency: int) -> "tuple[List[float], float]":
    """``concurrency`` clients, each on its own connection (opened before the clock starts: the
    server closes connections idle for seconds, as they are while the in-process round runs),
    taking the next body until none is left: each request's latency and the wall time."""
    connections = [http.client.HTTPConnection("127.0.0.1", port, timeout=600) for _ in range(concurrency)]
    for c in connections:
        c.connect()
    seconds: List[float] = []
    lock = threading.Lock()
    todo = list(bodies)

    def client(connection: http.client.HTTPConnection) -> None:
        while True:
            with lock:
                if not todo:
                    return
                body = todo.pop()
            s = post(connection, body)
            with lock:
                seconds.append(s)

    threads = [threading.Thread(target=client, args=(c,)) for c in connections]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    for c in connections:
        c.close()
    if len(seconds) != len(bodies):
        raise SystemExit(f"{len(bodies) - len(seconds)} requests failed")
    return seconds, wall


def interleaved(model: torch.nn.Module, port: int, paths: Sequence[str], bodies: Sequence[bytes],
                concurrency: int) -> "tuple[Dict[str, float], Dict[str, float]]":
    """The server at ``concurrency`` clients and its in-process peer (``predict`` with
    ``batch_size=concurrency``) in alternating rounds of ``concurrency`` images, so that the load
    of a shared machine falls on both alike: (in-process figures, server figures)."""
    load(port, bodies[:concurrency], concurrency)  # warm-up: the worker's first batch, predict's
    in_process(model, paths[:concurrency])
    sides = {"local": ([], 0.0), "server": ([], 0.0)}
    for start in range(0, len(paths), concurrency):
        for side, (seconds, wall) in (("local", in_process(model, paths[start:start + concurrency])),
                                      ("server", load(port, bodies[start:start + concurrency], concurrency))):
            sides[side] = (sides[side][0] + seconds, sides[side][1] + wall)
    return tuple({"rps": len(seconds) / wall, **percentiles(seconds)} for seconds, wall in sides.values())


def mask_response(size: int, n: int = 100, repeats: int = 3) -> Dict[str, float]:
    """The server's answer (``serve.responses.predict_response``, then JSON as the server writes it)
    to ``n`` detections with size x size masks (ellipses), the masks as COCO RLE and as nested lists
    of 0/1: bytes, and the best of ``repeats`` times from the model's uint8 masks to the JSON text."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    masks = []
    for _ in range(n):
        cy, cx = rng.uniform(0, size, 2)
        ry, rx = rng.uniform(size / 20, size / 4, 2)
        masks.append((((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).astype(np.uint8))
    result = {"boxes": torch.rand(n, 4) * size, "scores": torch.rand(n), "labels": torch.ones(n, dtype=torch.int64),
              "names": ["thing"] * n}
    out = {}
    for name, encode in (("rle", mask_rle), ("lists", lambda m: m.tolist())):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            record = predict_response({**result, "masks": [encode(m) for m in masks]}, size, size, None, True)
            text = json.dumps(record, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
            times.append(time.perf_counter() - t)
        out[f"{name}_bytes"], out[f"{name}_ms"] = len(text.encode()), min(times) * 1e3
    return out


def machine(threads: int) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return (f"{cpu}, {os.cpu_count()} logical CPUs, load average {os.getloadavg()[0]:.1f} at the end; "
            f"torch {torch.__version__}, {threads} thread(s) in the server and in-process")


def row(name: str, m: Dict[str, float]) -> str:
    return f"| {name} | {m['rps']:.2f} | {m['p50']:.0f} | {m['p95']:.0f} | {m['p99']:.0f} |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="image side and model input side (256)")
    parser.add_argument("--requests", type=int, default=16, help="requests per measured run (16)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, server and in-process (1)")
    parser.add_argument("--batch-timeout", type=float, default=0.01, help="the batching server's (0.01 s)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "serve.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = ["| run | requests/s | p50 ms | p95 ms | p99 ms |", "|---|---|---|---|---|"]
    ratios = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_images(tmp, args.requests, args.size)
        bodies = [open(p, "rb").read() for p in paths]
        model = make_model(paths, args.size)
        folder = os.path.join(tmp, "model")
        save_pretrained(model, folder)
        for batch in (1, 8):
            with Server(folder, args.threads, batch, args.batch_timeout) as server:
                for concurrency in (1, 8):
                    local, served = interleaved(model, server.port, paths, bodies, concurrency)
                    peer = "one image per call" if concurrency == 1 else f"batch_size={concurrency}"
                    lines.append(row(f"`hrnetdet serve --max-batch-size {batch}`, {concurrency} concurrent "
                                     f"client(s)", served))
                    lines.append(row(f"... in-process `hrnetdet.predict`, {peer}, in the same rounds", local))
                    print(*lines[-2:], sep="\n", flush=True)
                    ratios[batch, concurrency] = (served["p50"] / local["p50"], served["rps"] / local["rps"])
    latency, throughput = ratios[8, 1][0], ratios[8, 8][1]
    masks = mask_response(args.size)
    text = "\n".join([
        f"# `hrnetdet serve` under load ({ARCH}, {args.size}x{args.size} JPEGs, {args.requests} requests per run)",
        "", "Each server run alternates with its in-process peer in rounds of as many images as clients "
        "(raw JPEG bodies over loopback, each client's connection opened before the round's clock starts; the in-process side decodes the same files).",
        "", *lines, "",
        f"- concurrency 1, batching server (`--max-batch-size 8`): p50 {latency:.3f}x in-process predict's "
        f"(target <= {TARGET_LATENCY}: {'met' if latency <= TARGET_LATENCY else 'MISSED'}); without batching "
        f"{ratios[1, 1][0]:.3f}x",
        f"- concurrency 8, batching server: {throughput:.3f}x the requests/s of in-process batched predict "
        f"(target >= {TARGET_THROUGHPUT}: {'met' if throughput >= TARGET_THROUGHPUT else 'MISSED'}); "
        f"without batching {ratios[1, 8][1]:.3f}x",
        f"- a 100-detection response with {args.size}x{args.size} masks: COCO RLE {masks['rle_bytes'] / 1024:.0f} KiB, "
        f"encoded in {masks['rle_ms']:.1f} ms; full masks as JSON lists {masks['lists_bytes'] / 1024:.0f} KiB, "
        f"{masks['lists_ms']:.0f} ms ({masks['lists_bytes'] / masks['rle_bytes']:.0f}x the bytes, "
        f"{masks['lists_ms'] / masks['rle_ms']:.0f}x the time)",
        "", machine(args.threads) + ".", ""])
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
