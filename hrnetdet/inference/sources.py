"""What ``predict`` reads: image files, folders, globs, http(s) URLs and video files (frames
through PyAV, the optional ``hrnetdet[video]`` extra), decoded in DataLoader workers.

URLs are downloaded afresh on every run, each into a new file of its own in a private folder
(``downloads/`` under hrnetdet's home, 0700), deleted once decoded: nothing is kept, so nothing
another user plants and nothing the server has since changed is ever reused, and no cache grows.
Images are read once per run, so a cache would save little; revalidating one would cost the same
request. Each download is capped in bytes and in time (an overall deadline, whatever the server's
pace), and follows redirects to http(s) only."""
import glob
import http.client
import os
import socket
import ssl
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, BinaryIO, Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..data.images import MAX_PIXELS, load_image, read_image, require_regular_file
from ..detectors.transform import MIN_IMAGE_SIDE
from ..io import hrnetdet_home, private_dir

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
URL_PREFIXES = ("http://", "https://")
DOWNLOAD_TIMEOUT_S = 30  # the most a download may wait for any one packet
DOWNLOAD_DEADLINE_S = 120  # the most a whole download may take
DOWNLOAD_MAX_BYTES = 64 << 20  # images larger than this are not fetched over http
CHUNK_BYTES = 1 << 16


def is_url(item: Any) -> bool:
    return isinstance(item, str) and item.lower().startswith(URL_PREFIXES)


def is_video(item: Any) -> bool:
    return isinstance(item, (str, os.PathLike)) and os.fspath(item).lower().endswith(VIDEO_EXTENSIONS)


def expand_inputs(inputs: Iterable[Any]) -> List[str]:
    """Image and video files from paths, folders (their image and video files, sorted), glob
    patterns and http(s) URLs (kept as they are). Listing only: nothing is opened here, so a FIFO
    or device is listed and then refused by the decoder, as a skip naming it."""
    media = IMAGE_EXTENSIONS + VIDEO_EXTENSIONS
    paths: List[str] = []
    for item in inputs:
        item = os.fspath(item)
        if is_url(item):
            paths.append(item)
        elif os.path.isdir(item):
            found = sorted(os.path.join(item, f) for f in os.listdir(item) if f.lower().endswith(media))
            if not found:
                raise FileNotFoundError(f"folder {item!r} holds no images or videos ({', '.join(media)})")
            paths += found
        elif os.path.exists(item):  # a FIFO or device too: decoding refuses it without opening it
            paths.append(item)
        elif glob.has_magic(item):
            found = sorted(p for p in glob.glob(item, recursive=True) if not os.path.isdir(p))
            if not found:
                raise FileNotFoundError(f"pattern {item!r} matches no files")
            paths += found
        else:
            raise FileNotFoundError(f"no such image file or folder: {item!r}")
    return paths


def download_dir() -> str:
    """The private folder downloads are written to (0700, refused when it is a link or another user's)."""
    return private_dir(os.path.join(hrnetdet_home(), "downloads"))


class DownloadFailed(ConnectionError):
    """A download stopped by one of its limits (size, deadline, redirect) or cut short by the server:
    the message says which."""


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Redirects followed to http(s) URLs only: a server cannot send the download to file:// or ftp://."""

    def http_error_302(self, req: Any, fp: Any, code: int, msg: str, headers: Any) -> Any:
        target = urllib.parse.urljoin(req.full_url, headers.get("location") or headers.get("uri") or "")
        if urllib.parse.urlsplit(target).scheme.lower() not in ("http", "https"):
            fp.close()
            raise DownloadFailed(f"refused a redirect to {target!r} (http and https only)")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def _opener(connections: List[http.client.HTTPConnection]) -> urllib.request.OpenerDirector:
    """An opener for http(s) alone (no file:, ftp: or data: handler) that lists each connection
    it makes in ``connections``, so that a deadline can cut them off wherever they wait."""
    def tracked(cls: Callable[..., http.client.HTTPConnection]) -> Callable[..., http.client.HTTPConnection]:
        def connect(host: str, **kwargs: Any) -> http.client.HTTPConnection:
            connections.append(cls(host, **kwargs))
            return connections[-1]
        return connect

    class HTTP(urllib.request.HTTPHandler):
        def http_open(self, req: Any) -> Any:
            return self.do_open(tracked(http.client.HTTPConnection), req)

    class HTTPS(urllib.request.HTTPSHandler):
        def https_open(self, req: Any) -> Any:
            return self.do_open(tracked(http.client.HTTPSConnection), req, context=ssl.create_default_context())

    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.ProxyHandler(), urllib.request.UnknownHandler(), HTTP(), HTTPS(),
                    urllib.request.HTTPDefaultErrorHandler(), _HttpOnlyRedirects(),
                    urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener


def _cut_off(connections: List[http.client.HTTPConnection]) -> None:
    """Shut the sockets of ``connections`` so that whatever waits on them returns now."""
    for conn in connections:
        if conn.sock is not None:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _copy_capped(response: Any, out: BinaryIO, max_bytes: int, expired: Callable[[], bool]) -> None:
    """The response body into ``out``, in chunks as they come: refused past ``max_bytes`` (without
    reading further) and cut short when the deadline passes; a body shorter than its
    Content-Length is an error."""
    declared = response.headers.get("Content-Length", "")
    declared = int(declared) if declared.isdigit() else None
    if declared is not None and declared > max_bytes:
        raise DownloadFailed(f"{declared} bytes, over the limit of {max_bytes}")
    size = 0
    while not expired():
        chunk = response.read1(CHUNK_BYTES)
        if not chunk:
            if declared is not None and size < declared and not expired():
                raise DownloadFailed(f"the server sent {size} of the {declared} bytes it announced (truncated)")
            return
        size += len(chunk)
        if size > max_bytes:
            raise DownloadFailed(f"more than {max_bytes} bytes, the limit")
        out.write(chunk)


def download(url: str, folder: Optional[str] = None, *, max_bytes: int = DOWNLOAD_MAX_BYTES,
             deadline_s: float = DOWNLOAD_DEADLINE_S, timeout_s: float = DOWNLOAD_TIMEOUT_S) -> str:
    """``url`` downloaded into a new file of its own in ``folder`` (default: ``download_dir()``),
    whose path is returned: the caller deletes it. Any failure is a ConnectionError naming the URL,
    with no file left: an HTTP error, more than ``max_bytes``, longer than ``deadline_s`` in all
    (connection, headers and body, however slowly the server sends them), a body shorter than
    announced, a redirect away from http(s)."""
    folder = folder or download_dir()
    suffix = os.path.splitext(urllib.parse.urlsplit(url).path)[1][:8]
    fd, path = tempfile.mkstemp(dir=folder, suffix=suffix or ".download")
    try:
        with os.fdopen(fd, "wb") as out:
            _fetch(url, out, max_bytes, deadline_s, timeout_s)
    except BaseException:
        os.remove(path)
        raise
    return path


def _fetch(url: str, out: BinaryIO, max_bytes: int, deadline_s: float, timeout_s: float) -> None:
    """``url``'s body into ``out`` within the limits; a watchdog shuts the connection at the
    deadline wherever it waits, since a socket timeout alone lets a server drip forever."""
    connections: List[http.client.HTTPConnection] = []
    end = time.monotonic() + deadline_s
    watchdog = threading.Timer(deadline_s, _cut_off, (connections,))
    watchdog.start()
    try:
        with _opener(connections).open(url, timeout=min(timeout_s, deadline_s)) as response:
            _copy_capped(response, out, max_bytes, lambda: time.monotonic() > end)
        if time.monotonic() > end:
            raise DownloadFailed(f"not done within {deadline_s:g} s")
    except DownloadFailed as e:
        raise DownloadFailed(f"cannot download {url}: {e}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        if time.monotonic() > end:
            raise DownloadFailed(f"cannot download {url}: not done within {deadline_s:g} s") from None
        raise ConnectionError(f"cannot download {url}: {_failure(e)}") from None
    finally:
        watchdog.cancel()


def _failure(e: BaseException) -> str:
    """Why a download failed, in one line."""
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, http.client.IncompleteRead):
        return f"the server stopped after {len(e.partial)} bytes (truncated)"
    reason = getattr(e, "reason", None) or str(e) or type(e).__name__
    return f"{reason} (offline? download the file yourself and give its path)"


def decode(item: Any, name: str, *, max_pixels: Optional[int] = MAX_PIXELS) -> Tensor:
    """An image input as a CHW tensor: integer pixels from files and URLs (``to_float`` scales
    them), [0, 1] floats from in-memory images. Files and URLs are refused (ValueError or OSError
    naming them) over ``max_pixels`` or under the detectors' smallest side, read from the header."""
    if is_url(item):
        path = download(item)
        try:
            return read_image(path, max_pixels=max_pixels, min_side=MIN_IMAGE_SIDE)
        except ValueError as e:
            raise ValueError(str(e).replace(repr(path), repr(item))) from None
        finally:
            os.remove(path)
    if isinstance(item, (str, os.PathLike)):
        return read_image(item, max_pixels=max_pixels, min_side=MIN_IMAGE_SIDE)
    return load_image(item, name)


class ImageInputs(torch.utils.data.Dataset):
    """Image inputs decoded on demand, in DataLoader workers: ``(i, image or None, error)``.
    A file that cannot be read or downloaded gives its error message instead of stopping the loader."""

    def __init__(self, items: Sequence[Any], *, max_pixels: Optional[int] = MAX_PIXELS):
        self.items = list(items)
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Tuple[int, Optional[Tensor], str]:
        try:
            return i, decode(self.items[i], f"input {i}", max_pixels=self.max_pixels), ""
        except (ValueError, OSError) as e:  # ConnectionError and FileNotFoundError are OSErrors
            return i, None, str(e)


def as_list(batch: List[Any]) -> List[Any]:
    """DataLoader collate that keeps the batch a list (images differ in size)."""
    return batch


def require_av() -> Any:
    try:
        import av
    except ImportError:
        raise ImportError("video input needs PyAV: pip install 'hrnetdet[video]' (or pip install av)") from None
    return av


def _require_local_file(path: Any) -> None:
    """A video path refused unless it is a regular file: FFmpeg would wait on a FIFO forever."""
    if not is_url(path):
        require_regular_file(path)


def video_frames(path: str) -> Iterator[Tuple[int, float, Tensor]]:
    """(frame index, timestamp in seconds, CHW uint8 RGB frame) of every frame of a video file."""
    av = require_av()
    try:
        _require_local_file(path)
        container = av.open(os.fspath(path))
    except (av.error.FFmpegError, OSError) as e:
        raise ValueError(f"cannot read {path!r} as a video: {e}") from None
    with container:
        stream = container.streams.video[0]
        for index, frame in enumerate(container.decode(stream)):
            timestamp = float(frame.time) if frame.time is not None else index / float(stream.average_rate or 1)
            yield index, timestamp, torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)


def video_rate(path: str) -> float:
    """Frames per second of a video file (its average rate)."""
    av = require_av()
    _require_local_file(path)
    with av.open(os.fspath(path)) as container:
        return float(container.streams.video[0].average_rate or 25)
