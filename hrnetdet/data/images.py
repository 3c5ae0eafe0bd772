"""The one image decoder, used by prediction, drawing, evaluation and training, so that a file is
seen the same way everywhere: upright (EXIF orientation applied) and RGB, whatever its mode.

JPEG and PNG go through ``torchvision.io.decode_image(mode=RGB, apply_exif_orientation=True)``:
on EXIF orientations 1-8, palette (with transparency), CMYK, grayscale, grey+alpha and RGBA it
gives PIL's pixels exactly, keeps 16-bit PNGs at 16 bits (PIL cuts 16-bit RGB to 8) and decodes
2-3x faster. Everything else goes through PIL: WEBP (torchvision ignores its EXIF orientation),
BMP, TIFF, GIF (first frame). ``tests/test_images.py`` checks both choices against PIL.
torchvision 0.29 deprecates its decoders in favour of TorchCodec: the warning is silenced here, and
PIL takes over where ``decode_image`` is gone.

Whichever decoder reads the pixels, PIL first reads the header alone (its ``open`` is lazy): an
image over ``max_pixels`` (``MAX_PIXELS`` by default) or under ``min_side`` is refused before any
decoder allocates, and a FIFO, socket or device is refused before it is opened. Errors are one
line naming the file, without the decoders' C++ source paths or object addresses.
"""
import io
import os
import re
import stat
import struct
import warnings
from typing import Any, BinaryIO, Optional, Tuple

import numpy as np
import torch
import torchvision.io
from torch import Tensor

TORCHVISION_FORMATS = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")  # JPEG, PNG signatures
# The default pixel limit: 64 megapixels holds the largest common camera frames (48-61 MP sensors,
# 8K video at 33 MP) while bounding one decoded image to 192 MB (384 MB at 16 bits), under PIL's
# own warning at 89 MP. Larger images (aerial, slides) need --max-pixels, a choice made knowingly.
MAX_PIXELS = 64_000_000
METADATA_BYTES = 16 << 20  # what a JPEG or PNG may carry besides its pixels (EXIF, ICC, text)
SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def _pil_to_tensor(im: Any) -> Tensor:
    """A PIL image as an upright CHW RGB tensor: uint16 for 16-bit modes, float32 in [0, 1] for
    float ones (scaled by their maximum), else uint8. Alpha is dropped, as cv2 does."""
    from PIL import ImageOps

    im = ImageOps.exif_transpose(im)
    if im.mode in SIXTEEN_BIT_MODES:
        arr = np.clip(np.asarray(im, dtype=np.int64), 0, 65535).astype(np.uint16)
        return torch.from_numpy(arr)[None].expand(3, -1, -1).contiguous()
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        arr = np.clip(arr / max(float(arr.max()), 1.0), 0, 1)
        return torch.from_numpy(arr)[None].expand(3, -1, -1).contiguous()
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1).contiguous()


def _shown(path: Any) -> str:
    """A path as it goes into a message: quoted, and printable even when the name is not UTF-8."""
    return repr(os.fsdecode(path))


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return kind
    return "not a regular file"


class ImageRefused(ValueError):
    """An input refused before decoding (not a regular file, too many pixels, too small): the
    message names the file and why."""


class TooManyPixels(ImageRefused):
    """An image refused for its size: more pixels (or bytes) than the limit allows (a server's 413)."""


def _require_regular(path: Any, mode: int) -> None:
    if not stat.S_ISREG(mode):
        raise ImageRefused(f"{_shown(path)} is {_file_kind(mode)}, not a regular file")


def require_regular_file(path: Any) -> None:
    """FileNotFoundError, or ImageRefused naming ``path`` when it is a FIFO, socket, device or
    folder: checked with ``stat`` before anything opens it, since opening a FIFO waits forever."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {_shown(path)}") from None
    _require_regular(path, mode)


def _open_regular(path: Any) -> BinaryIO:
    """``path`` opened for reading when it is a regular file: checked before opening, and again on
    the opened file (non-blocking, so a FIFO swapped in between cannot stall the open)."""
    require_regular_file(path)
    f = os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb")
    try:
        _require_regular(path, os.fstat(f.fileno()).st_mode)
    except ImageRefused:
        f.close()
        raise
    return f


def _reason(e: BaseException) -> str:
    """A decoder's error as one line for the user: no C++ source location, no object address."""
    from PIL import UnidentifiedImageError

    if isinstance(e, UnidentifiedImageError):
        return "not an image file (unknown format)"
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    text = re.sub(r"^.*?\S+\.(?:cpp|cc|cu|cxx|c|h|hpp):\d+,?\s*", "", text)  # "decode_jpeg, /__w/.../x.cpp:171, "
    return re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "the file", text) or type(e).__name__


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} megapixels"


def check_size(path: Any, size: Tuple[int, int], max_pixels: Optional[int], min_side: int) -> None:
    """An image's ``size`` (width, height) against the limits: a file's from its header, before any
    decoder allocates; an in-memory image's or a video frame's as it comes. Raises ImageRefused."""
    width, height = size
    if max_pixels is not None and width * height > max_pixels:
        raise TooManyPixels(f"{_shown(path)} is {width}x{height} pixels ({_megapixels(width * height)}), over the "
                            f"limit of {_megapixels(max_pixels)} (raise it with --max-pixels)")
    if min(width, height) < min_side:
        raise ImageRefused(f"{_shown(path)} is {width}x{height} pixels; images need at least {min_side} on "
                         f"each side")


def _bomb_refusal(path: Any, e: BaseException, max_pixels: Optional[int]) -> TooManyPixels:
    """PIL's own bomb limit (2x ``PIL.Image.MAX_IMAGE_PIXELS``) fired in its header reader, before we
    saw the size: the refusal in our words, with the pixel count PIL read."""
    from PIL import Image

    pil_limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
    found = re.search(r"\((\d+) pixels\)", str(e))
    claimed = _megapixels(int(found.group(1))) if found else f"more than {_megapixels(pil_limit)}"
    limit = (f"the limit of {_megapixels(max_pixels)} (raise it with --max-pixels)"
             if max_pixels is not None and max_pixels < pil_limit
             else f"PIL's own limit of {_megapixels(pil_limit)} (PIL.Image.MAX_IMAGE_PIXELS)")
    return TooManyPixels(f"{_shown(path)} claims {claimed} in its header, over {limit}")


def read_image(path: str, *, max_pixels: Optional[int] = MAX_PIXELS, min_side: int = 1) -> Tensor:
    """An image file as an upright CHW RGB tensor as stored: uint8, or uint16 for 16-bit files
    (``to_float`` scales either to [0, 1]). Kept integer so decode workers pass a quarter of the
    bytes. Raises FileNotFoundError, or ValueError naming the file when it is not a regular file,
    cannot be decoded, or its header gives more than ``max_pixels`` pixels (``None``: no limit of
    ours) or a side under ``min_side``: the size is read from the header (PIL reads only that on
    open) before any decoder allocates, whichever decoder then reads the pixels."""
    with _open_regular(path) as f:
        return _decode(path, f, max_pixels, min_side)


def decode_image_bytes(data: bytes, name: str, *, max_pixels: Optional[int] = MAX_PIXELS, min_side: int = 1
                       ) -> Tensor:
    """An encoded image (a file's bytes, from object storage or a database) as ``read_image``
    reads a file, with the same limits and messages; ``name`` (its path or key) labels it in errors."""
    return _decode(name, io.BytesIO(data), max_pixels, min_side)


def _decode(path: Any, f: BinaryIO, max_pixels: Optional[int], min_side: int) -> Tensor:
    """The image in the open file ``f`` (named ``path`` in errors): see ``read_image``."""
    from PIL import Image

    by_torchvision = f.read(8).startswith(TORCHVISION_FORMATS) and hasattr(torchvision.io, "decode_image")
    f.seek(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our limit speaks
            with Image.open(f) as im:
                check_size(path, im.size, max_pixels, min_side)
                if not by_torchvision:
                    return _pil_to_tensor(im)
        return _torchvision_decode(path, f, max_pixels)
    except ImageRefused:
        raise
    except Image.DecompressionBombError as e:
        raise _bomb_refusal(path, e, max_pixels) from None
    except (OSError, RuntimeError, SyntaxError, ValueError, struct.error, EOFError) as e:
        raise ValueError(f"cannot read {_shown(path)} as an image: {_reason(e)}") from None


def _torchvision_decode(path: Any, f: BinaryIO, max_pixels: Optional[int]) -> Tensor:
    """A JPEG or PNG file through torchvision, read whole: refused first when the file is larger
    than any image within ``max_pixels`` could be (8 bytes a pixel: 16-bit RGBA, plus metadata)."""
    size = f.seek(0, io.SEEK_END)
    if max_pixels is not None and size > 8 * max_pixels + METADATA_BYTES:
        raise TooManyPixels(f"{_shown(path)} holds {size} bytes, more than an image of {_megapixels(max_pixels)} "
                            f"needs (raise it with --max-pixels)")
    f.seek(0)
    data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torchvision.io.decode_image(data, mode=torchvision.io.ImageReadMode.RGB, apply_exif_orientation=True)


def to_float(image: Tensor) -> Tensor:
    """uint8 or uint16 pixels (or floats already in [0, 1]) as float32 in [0, 1]."""
    if image.dtype == torch.uint8:
        return image.float().div_(255)
    if image.dtype == torch.uint16:
        return image.float().div_(65535)
    return image.float()


def load_image(image: Any, name: str = "image") -> Tensor:
    """A CHW float32 RGB tensor in [0, 1] from a path, a PIL image, an HWC uint8 RGB numpy array
    or a CHW tensor (uint8, or float in [0, 1]). ``name`` labels the input in errors."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        return to_float(read_image(image))
    if isinstance(image, Image.Image):
        return to_float(_pil_to_tensor(image))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"{name}: numpy images must be HWC uint8 RGB, got shape {image.shape} "
                             f"dtype {image.dtype}")
        return torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div_(255)
    if isinstance(image, Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"{name}: tensor images must be CHW RGB, got shape {list(image.shape)}")
        if image.dtype == torch.uint8:
            return image.float().div_(255)
        if not image.is_floating_point():
            raise ValueError(f"{name}: tensor images must be uint8 or float, got {image.dtype}")
        return image
    raise TypeError(f"{name}: expected a path, PIL image, numpy array or tensor, got {type(image).__name__}")
