"""What predict reads, tried as a hostile server and an unlucky folder would: downloads against a
loopback HTTP server this file starts (endless, dripping, truncated and redirecting answers),
FIFOs among the images, the old shared download cache."""
import hashlib
import http.server
import io
import os
import socket
import tempfile
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from hrnetdet.inference.sources import ImageInputs, decode, download, expand_inputs

RGB = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
PLANTED = np.zeros((16, 16, 3), dtype=np.uint8)
ENDLESS_BOUND = 64 << 20  # what the endless answer stops at, so that a reader without a cap ends too
DRIP_SECONDS = 4  # how long the dripping answers drip before they give up


def _png(arr):
    buffer = io.BytesIO()
    Image.fromarray(arr).save(buffer, "PNG")
    return buffer.getvalue()


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests, self.sent, self.ftp_port = [], {}, 0


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.requests.append(self.path)
        route = getattr(self, "route_" + self.path.strip("/").split(".")[0].replace("-", "_"), None)
        if route is None:
            self.send_error(404)
            return
        try:
            route()
        except OSError:  # the client hung up: what the limits are for
            pass

    def _head(self, length=None, code=200, **headers):
        self.send_response(code)
        if length is not None:
            self.send_header("Content-Length", str(length))
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Connection", "close")
        self.end_headers()

    def route_image(self):
        body = _png(RGB)
        self._head(len(body))
        self.wfile.write(body)

    def route_endless(self):
        self._head()
        chunk, sent = bytes(1 << 16), 0
        while sent < ENDLESS_BOUND:
            self.wfile.write(chunk)
            sent += len(chunk)
            self.server.sent["endless"] = sent

    def route_announced(self):
        self._head(1 << 30)
        self.wfile.write(bytes(1 << 16))

    def route_drip(self):
        self._head(1000)
        for _ in range(DRIP_SECONDS * 20):
            self.wfile.write(b"x")
            self.wfile.flush()
            time.sleep(0.05)

    def route_slow_headers(self):
        self.wfile.write(b"HTTP/1.1 200 OK\r\n")
        for _ in range(DRIP_SECONDS * 20):
            self.wfile.write(b"X-Slow: 1\r\n")
            self.wfile.flush()
            time.sleep(0.05)

    def route_truncated(self):
        self._head(1000)
        self.wfile.write(b"x" * 10)

    def route_to_file(self):
        self._head(0, 302, Location="file:///etc/hostname")

    def route_to_ftp(self):
        self._head(0, 302, Location=f"ftp://127.0.0.1:{self.server.ftp_port}/x.png")


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # a proxy in the environment must not answer for loopback
    srv = Server()
    ftp = socket.socket()  # where the ftp redirect points: counts who connects
    ftp.bind(("127.0.0.1", 0))
    ftp.listen(4)
    ftp.settimeout(0.1)
    srv.ftp_port = ftp.getsockname()[1]
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    srv.ftp_connections = lambda: _accepted(ftp)
    yield srv
    srv.shutdown()
    srv.server_close()
    ftp.close()


def _accepted(listener):
    count = 0
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return count
        conn.close()
        count += 1


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HRNETDET_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_urls_are_downloaded_into_a_private_folder_and_not_kept(server, home):
    image = decode(f"{server.url}/image.png", "input 0")
    assert torch.equal(image, torch.from_numpy(RGB).permute(2, 0, 1))
    downloads = home / "downloads"
    assert downloads.is_dir() and downloads.stat().st_mode & 0o777 == 0o700
    assert os.listdir(downloads) == []


def test_a_file_planted_in_the_old_shared_cache_is_not_trusted(server, home, tmp_path, monkeypatch):
    """The old cache, /tmp/hrnetdet-downloads/<sha256 of the URL>, was used without a request."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    url = f"{server.url}/image.png"
    planted = tmp_path / "hrnetdet-downloads" / (hashlib.sha256(url.encode()).hexdigest()[:32] + ".png")
    planted.parent.mkdir()
    planted.write_bytes(_png(PLANTED))
    for _ in range(2):  # and nothing is reused without asking the server again
        assert torch.equal(decode(url, "input 0"), torch.from_numpy(RGB).permute(2, 0, 1))
    assert server.requests == ["/image.png", "/image.png"]


def test_an_endless_body_is_cut_at_the_size_cap_and_leaves_no_file(server, tmp_path):
    """The old reader buffered the whole body (2.6 GB against a real endless server)."""
    with pytest.raises(ConnectionError, match=rf"cannot download {server.url}/endless: more than 1048576 bytes"):
        download(f"{server.url}/endless", str(tmp_path), max_bytes=1 << 20)
    assert os.listdir(tmp_path) == []
    time.sleep(0.2)
    assert server.sent["endless"] < ENDLESS_BOUND // 2  # the server was stopped, not read to its end
    with pytest.raises(ConnectionError, match=r"1073741824 bytes, over the limit of 1048576"):
        download(f"{server.url}/announced", str(tmp_path), max_bytes=1 << 20)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("route", ["drip", "slow-headers"])
def test_a_dripping_server_is_cut_off_at_the_deadline(server, tmp_path, route):
    """A byte every 50 ms never trips a socket timeout: only an overall deadline ends it."""
    start = time.monotonic()
    with pytest.raises(ConnectionError, match=rf"cannot download {server.url}/{route}: not done within 0.5 s"):
        download(f"{server.url}/{route}", str(tmp_path), deadline_s=0.5)
    assert time.monotonic() - start < 2
    assert os.listdir(tmp_path) == []


def test_redirects_lead_to_http_and_https_only(server, tmp_path):
    for route, target in (("to-file", "file:///etc/hostname"), ("to-ftp", f"ftp://127.0.0.1:{server.ftp_port}/")):
        with pytest.raises(ConnectionError, match=rf"cannot download {server.url}/{route}: refused a redirect "
                                                  rf"to '{target}.*' \(http and https only\)"):
            download(f"{server.url}/{route}", str(tmp_path), deadline_s=5)
    assert server.ftp_connections() == 0
    assert os.listdir(tmp_path) == []


def test_truncated_and_missing_downloads_are_one_line_skips(server, home):
    """A truncated body raised http.client.IncompleteRead through the decode workers (a traceback)."""
    urls = [f"{server.url}/truncated.png", f"{server.url}/missing.png"]
    inputs = ImageInputs(urls)
    truncated, missing = inputs[0], inputs[1]
    assert truncated[:2] == (0, None) and missing[:2] == (1, None)
    assert truncated[2] == f"cannot download {urls[0]}: the server sent 10 of the 1000 bytes it announced (truncated)"
    assert missing[2] == f"cannot download {urls[1]}: HTTP 404 Not Found"
    assert os.listdir(home / "downloads") == []


def test_fifos_in_a_folder_are_listed_then_skipped_without_hanging(tmp_path):
    """A FIFO named x.jpg in a folder hung the run forever (and a FIFO given by name was 'no such file')."""
    Image.fromarray(RGB).save(tmp_path / "a.png")
    os.mkfifo(tmp_path / "x.jpg")
    listed = expand_inputs([str(tmp_path)])
    assert listed == [str(tmp_path / "a.png"), str(tmp_path / "x.jpg")]
    assert expand_inputs([str(tmp_path / "x.jpg")]) == [str(tmp_path / "x.jpg")]
    outcome = []
    reader = threading.Thread(target=lambda: outcome.append(ImageInputs(listed)[1]), daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():  # the old decoder waits in open(): a writer lets it go
        os.close(os.open(tmp_path / "x.jpg", os.O_WRONLY | os.O_NONBLOCK))
        reader.join(10)
    assert outcome == [(1, None, f"'{tmp_path / 'x.jpg'}' is a FIFO, not a regular file")]


def test_images_too_small_for_the_detectors_are_skips_naming_the_file(server, home, tmp_path):
    """A 1x1 image reached the model and stopped the run with 'image 0: 1x1 pixels'."""
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    Image.fromarray(RGB).save(tmp_path / "a.png")
    got = ImageInputs([str(tmp_path / "dot.png"), str(tmp_path / "a.png")])
    assert got[0] == (0, None, f"'{tmp_path / 'dot.png'}' is 1x1 pixels; images need at least 8 on each side")
    assert got[1][1].shape == (3, 24, 32)


def test_the_pixel_limit_reaches_the_inputs(server, home, tmp_path):
    Image.fromarray(RGB).save(tmp_path / "a.png")
    for item in (str(tmp_path / "a.png"), f"{server.url}/image.png"):
        assert ImageInputs([item], max_pixels=24 * 32)[0][1].shape == (3, 24, 32)
        _, image, error = ImageInputs([item], max_pixels=24 * 32 - 1)[0]
        assert image is None and error == (f"{item!r} is 32x24 pixels (0.0 megapixels), over the limit of "
                                           f"0.0 megapixels (raise it with --max-pixels)")
    assert os.listdir(home / "downloads") == []


def test_a_fifo_named_like_a_video_is_refused_without_hanging(tmp_path):
    pytest.importorskip("av")
    from hrnetdet.inference.sources import video_frames, video_rate

    os.mkfifo(tmp_path / "x.mp4")
    for read in (lambda: next(video_frames(str(tmp_path / "x.mp4"))), lambda: video_rate(str(tmp_path / "x.mp4"))):
        with pytest.raises(ValueError, match="x.mp4' is a FIFO, not a regular file"):
            read()
