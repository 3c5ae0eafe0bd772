"""What ``POST /predict`` accepts, checked without a server (so every refusal is unit-testable): the
content type, the body's parts (multipart, a raw image, JSON with base64), the options, the image's
pixels from its header. Each refusal is a ``RequestError`` carrying its HTTP status and one line
naming the problem; nothing here blocks or holds more than the (already capped) body."""
import base64
import binascii
import email.parser
import email.policy
import json
from typing import Any, Dict, Mapping, NamedTuple, Optional

import numpy as np

from ..data.images import TooManyPixels, decode_image_bytes
from ..detectors.transform import MIN_IMAGE_SIDE
from ..inference.options import OptionError, PredictOptions

IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp", "image/bmp", "image/gif")
BODY_TYPES = ("multipart/form-data", "application/json") + IMAGE_TYPES
MASK_CHOICES = ("rle", "none")
UPLOAD_NAME = "the uploaded image"


class RequestError(Exception):
    """A request the server refuses: ``status`` (400, 401, 413, 415) and a one-line ``message``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class Upload(NamedTuple):
    """A request's image bytes and its options as given (text from a query or form, JSON values)."""
    data: bytes
    options: Dict[str, Any]


def media_type(content_type: Optional[str]) -> str:
    return (content_type or "").split(";")[0].strip().lower()


def check_length(content_length: Optional[str], limit: int) -> None:
    """A declared body over ``limit`` bytes: refused before a byte of it is read."""
    if content_length is not None and content_length.strip().isdigit() and int(content_length) > limit:
        raise too_large(int(content_length), limit)


def too_large(size: int, limit: int) -> RequestError:
    return RequestError(413, f"the request body is {size} bytes or more, over the limit of {limit} bytes "
                             f"({limit / 2 ** 20:g} MB, the server's --max-upload-mb)")


def accepted_type(content_type: Optional[str]) -> str:
    """The body's media type when the API takes it (checked before the body is read), else 415."""
    kind = media_type(content_type)
    if kind not in BODY_TYPES:
        shown = f"content type {kind!r} is" if kind else "a body without a content type is"
        raise RequestError(415, f"{shown} not accepted: send one of {', '.join(BODY_TYPES)}")
    return kind


def parse_body(content_type: Optional[str], body: bytes) -> Upload:
    """The image and options of a body of ``content_type``: a multipart form (file field ``image``,
    option fields), a raw ``image/*`` body, or JSON ``{"image": base64, ...options}``."""
    kind = accepted_type(content_type)
    if kind == "multipart/form-data":
        return _multipart(content_type or "", body)
    if kind == "application/json":
        return _json(body)
    return Upload(body, {})


def _multipart(content_type: str, body: bytes) -> Upload:
    header = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(header + body)
    if not message.is_multipart():
        raise RequestError(400, "the multipart body cannot be read (no boundary, or no parts)")
    data, options = None, {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            raise RequestError(400, "a multipart part has no name (expected the file field 'image' and options)")
        value = part.get_payload(decode=True) or b""
        if name in options or (name == "image" and data is not None):
            raise RequestError(400, f"the form field {name!r} is given twice")
        if name == "image":
            data = value
        else:
            options[name] = value.decode("utf-8", "replace")
    if data is None:
        raise RequestError(400, "the form has no file field 'image'")
    return Upload(data, options)


def _json(body: bytes) -> Upload:
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, ValueError) as e:
        raise RequestError(400, f"the JSON body cannot be read: {e}") from None
    if not isinstance(payload, dict):
        raise RequestError(400, f"the JSON body must be an object with the key 'image', got {type(payload).__name__}")
    if "image" not in payload:
        raise RequestError(400, "the JSON body has no key 'image' (the image as base64)")
    encoded = payload.pop("image")
    if not isinstance(encoded, str):
        raise RequestError(400, f"'image' must be base64 text, got {type(encoded).__name__}")
    try:
        data = base64.b64decode(encoded.split(",", 1)[-1] if encoded.startswith("data:") else encoded, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(400, f"'image' is not valid base64: {e}") from None
    return Upload(data, payload)


def merge_options(query: Mapping[str, str], given: Mapping[str, Any]) -> Dict[str, Any]:
    """The query string's options and the body's: an option in both is refused, not guessed."""
    clash = sorted(set(query) & set(given))
    if clash:
        raise RequestError(400, f"option {clash[0]!r} is given both in the query string and in the body")
    return {**given, **query}


def _number(name: str, value: Any, kind: type) -> Any:
    if isinstance(value, bool):
        raise RequestError(400, f"option {name} must be a number, got {value!r}")
    if isinstance(value, (int, float)) and kind is float:
        return float(value)
    if isinstance(value, int) and kind is int:
        return value
    try:
        return kind(str(value).strip())
    except ValueError:
        kind_name = "a whole number" if kind is int else "a number"
        raise RequestError(400, f"option {name} must be {kind_name}, got {value!r}") from None


def _flag(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off", ""):
        return False
    raise RequestError(400, f"option {name} must be true or false, got {value!r}")


class Request(NamedTuple):
    """A checked request: the options record the model runs with, and whether masks are sent."""
    options: PredictOptions
    masks: bool


OPTIONS = ("score_thresh", "max_det", "masks", "slice", "overlap", "tta")


def parse_options(given: Mapping[str, Any], base: PredictOptions, has_masks: bool) -> Request:
    """``given`` (query, form or JSON values) as a ``PredictOptions`` record over ``base``: each
    value's type and range checked, an unknown name refused with the known ones listed."""
    unknown = sorted(set(given) - set(OPTIONS))
    if unknown:
        raise RequestError(400, f"unknown option {unknown[0]!r} (options: {', '.join(OPTIONS)})")
    fields: Dict[str, Any] = {}
    if "score_thresh" in given:
        fields["score_thresh"] = _number("score_thresh", given["score_thresh"], float)
    if "max_det" in given:
        fields["max_det"] = _number("max_det", given["max_det"], int)
    if "slice" in given:
        side = _number("slice", given["slice"], int)
        if side < 0:
            raise RequestError(400, f"option slice must be a tile side in pixels (0: off), got {given['slice']!r}")
        fields["slice"] = side or None
    if "overlap" in given:
        fields["overlap"] = _number("overlap", given["overlap"], float)
    if "tta" in given:
        fields["tta"] = _flag("tta", given["tta"])
    masks = str(given.get("masks", "rle")).strip().lower()
    if masks not in MASK_CHOICES:
        raise RequestError(400, f"option masks must be one of {', '.join(MASK_CHOICES)}, got {given['masks']!r}")
    masks_sent = has_masks and masks == "rle"
    fields["mask_format"] = "rle" if masks_sent else "uint8"
    try:
        return Request(base.replace(**fields), masks_sent)
    except OptionError as e:
        raise RequestError(400, f"option {e}") from None


def decode_upload(data: bytes, max_pixels: Optional[int]) -> np.ndarray:
    """The uploaded image's pixels as a CHW RGB array as stored (uint8, or uint16 for 16-bit PNGs),
    what ``read_image`` gives ``hrnetdet.predict`` for the same file. Over ``max_pixels`` (read from the
    header, before any decoder allocates): 413; not an image, truncated, or too small: 400."""
    if not data:
        raise RequestError(400, "the image is empty (0 bytes)")
    try:
        image = decode_image_bytes(data, UPLOAD_NAME, max_pixels=max_pixels, min_side=MIN_IMAGE_SIDE)
    except TooManyPixels as e:
        raise RequestError(413, str(e)) from None
    except ValueError as e:  # not an image, truncated, or a side under the smallest the detectors take
        raise RequestError(400, str(e)) from None
    return image.numpy()
