"""The one image decoder, used by prediction, drawing, evaluation and training, so that a file is
seen the same way everywhere: upright (EXIF orientation applied) and RGB, whatever its mode.

JPEG and PNG go through ``torchvision.io.decode_image(mode=RGB, apply_exif_orientation=True)``:
on EXIF orientations 1-8, palette (with transparency), CMYK, grayscale, grey+alpha and RGBA it
gives PIL's pixels exactly, keeps 16-bit PNGs at 16 bits (PIL cuts 16-bit RGB to 8) and decodes
2-3x faster. Everything else goes through PIL: WEBP (torchvision ignores its EXIF orientation),
BMP, TIFF, GIF (first frame). ``tests/test_images.py`` checks both choices against PIL.
torchvision 0.29 deprecates its decoders in favour of TorchCodec: the warning is silenced here, and
PIL takes over where ``decode_image`` is gone.
"""
import io
import os
import warnings
from typing import Any

import numpy as np
import torch
import torchvision.io
from torch import Tensor

TORCHVISION_FORMATS = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")  # JPEG, PNG signatures
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


def read_image(path: str) -> Tensor:
    """An image file as an upright CHW RGB tensor as stored: uint8, or uint16 for 16-bit files
    (``to_float`` scales either to [0, 1]). Kept integer so decode workers pass a quarter of the
    bytes. Raises FileNotFoundError, or ValueError naming the file when it cannot be decoded."""
    from PIL import Image, UnidentifiedImageError

    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"no such image file: {path!r}") from None
    try:
        if data.startswith(TORCHVISION_FORMATS) and hasattr(torchvision.io, "decode_image"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                return torchvision.io.decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                                   mode=torchvision.io.ImageReadMode.RGB,
                                                   apply_exif_orientation=True)
        with Image.open(io.BytesIO(data)) as im:
            return _pil_to_tensor(im)
    except (UnidentifiedImageError, OSError, RuntimeError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read {path!r} as an image: {e}") from None


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
