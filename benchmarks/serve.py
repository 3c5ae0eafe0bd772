"""``hrnetdet serve`` under load on loopback, beside ``hrnetdet.predict`` on the same images in the
same run, and the cost of masks in a response:

- in-process ``hrnetdet.predict``: one image per call (latency) and ``batch_size=8`` (throughput);
- the server with no batching (``--max-batch-size 1``) and with dynamic batching (``--max-batch-size
  8``), each at 1 and at 8 concurrent clients (keep-alive connections, raw JPEG bodies, every request
  checked to answer 200 with detections): requests/s and p50/p95/p99 latency;
- a 100-detection mask response: its JSON size and encode time with masks as COCO RLE against the
  naive full-mask JSON lists.

    python benchmarks/serve.py [--size 320] [--requests 16] [--threads 1] [--out benchmarks/serve.md]

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


def in_process(model: torch.nn.Module, paths: Sequence[str], batch_size: int) -> Dict[str, float]:
    """``hrnetdet.predict`` on the files (decoding included, as the server's requests include it):
    each call's latency at batch 1, or the throughput of one call over all files in batches."""
    hrnetdet.predict(model, list(paths[:batch_size]), batch_size=batch_size, num_workers=0)  # warm-up
    if batch_size == 1:
        seconds = []
        start = time.perf_counter()
        for path in paths:
            t = time.perf_counter()
            hrnetdet.predict(model, path, num_workers=0)
            seconds.append(time.perf_counter() - t)
        return {"rps": len(paths) / (time.perf_counter() - start), **percentiles(seconds)}
    start = time.perf_counter()
    results = hrnetdet.predict(model, list(paths), batch_size=batch_size, num_workers=0)
    wall = time.perf_counter() - start
    assert all(len(r["scores"]) for r in results)
    return {"rps": len(paths) / wall, "p50": float("nan"), "p95": float("nan"), "p99": float("nan")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``hrnetdet serve`` in a child process on 127.0.0.1, stopped on exit."""

    def __init__(self, checkpoint: str, threads: int, max_batch_size: int, batch_timeout: float):
        self.port = free_port()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        env.pop("HRNETDET_API_KEY", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hrnetdet.cli", "serve", ARCH, "--checkpoint", checkpoint, "--host", "127.0.0.1",
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


def load(port: int, bodies: Sequence[bytes], concurrency: int) -> Dict[str, float]:
    """``concurrency`` clients, each on its own connection, taking the next body until none is
    left (so at most ``concurrency`` requests are in flight): requests/s and latency percentiles."""
    connections = [http.client.HTTPConnection("127.0.0.1", port, timeout=600) for _ in range(concurrency)]
    post(connections[0], bodies[0])  # warm-up: the worker's first batch done
    for c in connections[1:]:
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
    return {"rps": len(bodies) / wall, **percentiles(seconds)}


def mask_response(size: int, n: int = 100, repeats: int = 3) -> Dict[str, float]:
    """A response of ``n`` detections with size x size masks (ellipses), encoded as JSON with COCO
    RLE masks, and with each mask as nested lists of 0/1: bytes and the best of ``repeats`` times."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    masks = []
    for _ in range(n):
        cy, cx = rng.uniform(0, size, 2)
        ry, rx = rng.uniform(size / 20, size / 4, 2)
        masks.append((((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).astype(np.uint8))
    base = {"label": "thing", "score": 0.5, "category_id": 1, "label_id": 1,
            "box": {"xmin": 1.0, "ymin": 2.0, "xmax": 3.0, "ymax": 4.0}}
    out = {}
    for name, encode in (("rle", mask_rle), ("lists", lambda m: m.tolist())):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            text = json.dumps({"width": size, "height": size,
                               "detections": [{**base, "mask": encode(m)} for m in masks]})
            times.append(time.perf_counter() - t)
        out[f"{name}_bytes"], out[f"{name}_ms"] = len(text.encode()), min(times) * 1e3
    return out


def machine(threads: int) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return (f"{cpu}, {os.cpu_count()} logical CPUs, load average {os.getloadavg()[0]:.1f} at the end; "
            f"torch {torch.__version__}, {threads} thread(s) in the server and in-process")


def row(name: str, m: Dict[str, float]) -> str:
    def ms(v: float) -> str:
        return "-" if np.isnan(v) else f"{v:.0f}"
    return f"| {name} | {m['rps']:.2f} | {ms(m['p50'])} | {ms(m['p95'])} | {ms(m['p99'])} |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=320, help="image side and model input side (320)")
    parser.add_argument("--requests", type=int, default=16, help="requests per measured run (16)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, server and in-process (1)")
    parser.add_argument("--batch-timeout", type=float, default=0.01, help="the batching server's (0.01 s)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "serve.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = ["| run | requests/s | p50 ms | p95 ms | p99 ms |", "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_images(tmp, args.requests, args.size)
        bodies = [open(p, "rb").read() for p in paths]
        model = make_model(paths, args.size)
        save_pretrained(model, os.path.join(tmp, "model"))
        checkpoint = os.path.join(tmp, "model", "model.safetensors")
        figures = {"predict, batch 1": in_process(model, paths, 1),
                   "predict, batch_size=8": in_process(model, paths, 8)}
        for name in figures:
            lines.append(row(f"in-process `hrnetdet.predict`, {name.split(', ')[1]}", figures[name]))
            print(lines[-1], flush=True)
        for batch in (1, 8):
            with Server(checkpoint, args.threads, batch, args.batch_timeout) as server:
                for concurrency in (1, 8):
                    name = f"server --max-batch-size {batch}, {concurrency} client(s)"
                    figures[name] = load(server.port, bodies, concurrency)
                    lines.append(row(f"`hrnetdet serve`, --max-batch-size {batch}, {concurrency} concurrent client(s)",
                                     figures[name]))
                    print(lines[-1], flush=True)
    base1, base8 = figures["predict, batch 1"], figures["predict, batch_size=8"]
    latency = figures["server --max-batch-size 8, 1 client(s)"]["p50"] / base1["p50"]
    throughput = figures["server --max-batch-size 8, 8 client(s)"]["rps"] / base8["rps"]
    masks = mask_response(args.size)
    text = "\n".join([
        f"# `hrnetdet serve` under load ({ARCH}, {args.size}x{args.size} JPEGs, {args.requests} requests per run)",
        "", *lines, "",
        f"- concurrency 1, batching server: p50 {latency:.3f}x in-process predict's "
        f"(target <= {TARGET_LATENCY}: {'met' if latency <= TARGET_LATENCY else 'MISSED'})",
        f"- concurrency 8, batching server: {throughput:.3f}x the requests/s of in-process batched predict "
        f"(target >= {TARGET_THROUGHPUT}: {'met' if throughput >= TARGET_THROUGHPUT else 'MISSED'})",
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
