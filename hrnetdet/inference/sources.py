"""What ``predict`` reads: image files, folders, globs, http(s) URLs (downloaded to a temporary
cache) and video files (frames through PyAV, the optional ``hrnetdet[video]`` extra), decoded in
DataLoader workers."""
import glob
import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from typing import Any, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..data.images import load_image, read_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
URL_PREFIXES = ("http://", "https://")
DOWNLOAD_TIMEOUT_S = 30


def is_url(item: Any) -> bool:
    return isinstance(item, str) and item.lower().startswith(URL_PREFIXES)


def is_video(item: Any) -> bool:
    return isinstance(item, (str, os.PathLike)) and os.fspath(item).lower().endswith(VIDEO_EXTENSIONS)


def expand_inputs(inputs: Iterable[Any]) -> List[str]:
    """Image and video files from paths, folders (their image and video files, sorted), glob
    patterns and http(s) URLs (kept as they are)."""
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
        elif os.path.isfile(item):
            paths.append(item)
        elif glob.has_magic(item):
            found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            if not found:
                raise FileNotFoundError(f"pattern {item!r} matches no files")
            paths += found
        else:
            raise FileNotFoundError(f"no such image file or folder: {item!r}")
    return paths


def download_cache_dir() -> str:
    return os.path.join(tempfile.gettempdir(), "hrnetdet-downloads")


def download(url: str, cache_dir: Optional[str] = None) -> str:
    """The local path of ``url``, downloaded once into ``cache_dir`` (default: a folder under the
    system's temporary directory) and written atomically, so concurrent workers never see half a file."""
    cache_dir = cache_dir or download_cache_dir()
    os.makedirs(cache_dir, exist_ok=True)
    suffix = os.path.splitext(url.split("?", 1)[0])[1][:8]
    path = os.path.join(cache_dir, hashlib.sha256(url.encode()).hexdigest()[:32] + suffix)
    if os.path.isfile(path):
        return path
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            data = response.read()
    except urllib.error.HTTPError as e:
        raise ConnectionError(f"cannot download {url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ConnectionError(f"cannot download {url}: {reason} (offline? download the file "
                              f"yourself and give its path)") from None
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".part")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return path


def decode(item: Any, name: str) -> Tensor:
    """An image input as a CHW tensor: integer pixels from files and URLs (``to_float`` scales
    them), [0, 1] floats from in-memory images."""
    if is_url(item):
        return read_image(download(item))
    if isinstance(item, (str, os.PathLike)):
        return read_image(item)
    return load_image(item, name)


class ImageInputs(torch.utils.data.Dataset):
    """Image inputs decoded on demand, in DataLoader workers: ``(i, image or None, error)``.
    A file that cannot be read or downloaded gives its error message instead of stopping the loader."""

    def __init__(self, items: Sequence[Any]):
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Tuple[int, Optional[Tensor], str]:
        try:
            return i, decode(self.items[i], f"input {i}"), ""
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


def video_frames(path: str) -> Iterator[Tuple[int, float, Tensor]]:
    """(frame index, timestamp in seconds, CHW uint8 RGB frame) of every frame of a video file."""
    av = require_av()
    try:
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
    with av.open(os.fspath(path)) as container:
        return float(container.streams.video[0].average_rate or 25)
