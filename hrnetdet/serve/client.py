"""``hrnetdet.Client(url)``: a ``hrnetdet serve`` server's answers as ``hrnetdet.predict``'s results
(tensors, masks decoded to (N, 1, H, W) uint8), so a script moves between a local model and a
remote one by one line. Standard library HTTP (urllib) and no server packages."""
import io
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Dict, List, Optional, Union

import numpy as np

from .requests import UPLOAD_NAME

API_KEY_ENV = "HRNETDET_API_KEY"
SIGNATURES = ((b"\xff\xd8\xff", "image/jpeg"), (b"\x89PNG\r\n\x1a\n", "image/png"), (b"GIF8", "image/gif"),
              (b"BM", "image/bmp"), (b"RIFF", "image/webp"))
Result = Dict[str, Any]


class RemoteError(RuntimeError):
    """The server refused a request or failed: ``status`` and its one-line ``message``."""

    def __init__(self, status: int, message: str, url: str):
        super().__init__(f"{url}: {message} (HTTP {status})")
        self.status, self.message = status, message


def content_type(data: bytes) -> str:
    """An image's media type from its first bytes (PNG when unknown: the server reads the content)."""
    return next((kind for magic, kind in SIGNATURES if data.startswith(magic)), "image/png")


def image_bytes(image: Any) -> bytes:
    """A file's bytes as they are; an in-memory image (PIL, HWC uint8 array, CHW tensor) as a
    lossless PNG (float tensors are rounded to 8 bits on the way)."""
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as f:
            return f.read()
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    from PIL import Image

    if not isinstance(image, Image.Image):
        array = image
        if hasattr(image, "detach"):  # a CHW tensor
            tensor = image.detach().cpu()
            if tensor.is_floating_point():
                tensor = (tensor.clamp(0, 1) * 255).round().byte()
            array = tensor.permute(1, 2, 0).numpy()
        image = Image.fromarray(np.ascontiguousarray(array))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def decode_masks(records: List[Dict[str, Any]], height: int, width: int) -> Any:
    """The detections' COCO RLE masks as an (N, 1, H, W) uint8 tensor, as ``predict`` gives them."""
    import torch
    from pycocotools import mask as mask_utils

    if not records:
        return torch.zeros((0, 1, height, width), dtype=torch.uint8)
    rles = [{"size": d["mask"]["size"], "counts": d["mask"]["counts"].encode("ascii")} for d in records]
    masks = mask_utils.decode(rles)  # (H, W, N)
    return torch.from_numpy(np.ascontiguousarray(masks.transpose(2, 0, 1))[:, None].astype(np.uint8))


def as_result(answer: Dict[str, Any], masks: bool) -> Result:
    """An API record as a ``predict`` result: boxes (N, 4) xyxy float32, labels int64, scores float32,
    masks (N, 1, H, W) uint8 when ``masks`` (the server sent them), names; best score first."""
    import torch

    detections = answer["detections"]
    boxes = [[d["box"][k] for k in ("xmin", "ymin", "xmax", "ymax")] for d in detections]
    result: Result = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                      "labels": torch.tensor([d["label_id"] for d in detections], dtype=torch.int64),
                      "scores": torch.tensor([d["score"] for d in detections], dtype=torch.float32)}
    if masks:
        result["masks"] = decode_masks(detections, answer["height"], answer["width"])
    result["names"] = [d["label"] for d in detections]
    return result


class Client:
    """A ``hrnetdet serve`` server at ``url`` (``http://127.0.0.1:8000``); ``api_key`` (default
    ``$HRNETDET_API_KEY``) is sent as ``X-API-Key``."""

    def __init__(self, url: str, api_key: Optional[str] = None, timeout: float = 120.0):
        self.url = url.rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
        self.timeout = timeout
        self._info: Optional[Dict[str, Any]] = None

    def _call(self, path: str, body: Optional[bytes] = None, headers: Optional[Dict[str, str]] = None) -> bytes:
        headers = dict(headers or {})
        if self.api_key:
            headers["X-API-Key"] = self.api_key
        request = urllib.request.Request(self.url + path, data=body, headers=headers,
                                         method="POST" if body is not None else "GET")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as e:
            text = e.read().decode("utf-8", "replace")
            try:
                message = json.loads(text)["error"]
            except (ValueError, KeyError, TypeError):
                message = text.strip() or e.reason
            raise RemoteError(e.code, message, f"{self.url}{path.split('?')[0]}") from None
        except urllib.error.URLError as e:
            raise ConnectionError(f"cannot reach {self.url}: {e.reason}") from None

    def health(self) -> Dict[str, Any]:
        return json.loads(self._call("/health"))

    def info(self) -> Dict[str, Any]:
        """The server's ``GET /info`` (the model, its categories, limits), fetched once."""
        if self._info is None:
            self._info = json.loads(self._call("/info"))
        return self._info

    def predict_record(self, image: Any, **options: Any) -> Dict[str, Any]:
        """The API's JSON record for one image; ``options``: score_thresh, max_det, masks ("rle" or
        "none"), slice, overlap, tta (see ``GET /info``)."""
        data = image_bytes(image)
        query = urllib.parse.urlencode({k: str(v).lower() if isinstance(v, bool) else v
                                        for k, v in options.items() if v is not None})
        return json.loads(self._call("/predict" + (f"?{query}" if query else ""), data,
                                     {"Content-Type": content_type(data)}))

    def predict(self, inputs: Any, **options: Any) -> Union[Result, List[Result]]:
        """``hrnetdet.predict``'s results from the server: one result for one image, a list for a
        list (paths, bytes, PIL images, arrays, tensors), each with ``input_index`` and, for
        paths, ``file_name``. A refused image raises ``RemoteError`` with the server's message."""
        single = not isinstance(inputs, (list, tuple))
        results = []
        for index, image in enumerate([inputs] if single else inputs):
            masks = self.info()["masks"] and options.get("masks", "rle") != "none"
            result = {**as_result(self.predict_record(image, **options), masks), "input_index": index}
            if isinstance(image, (str, os.PathLike)):
                result["file_name"] = os.fspath(image)
            results.append(result)
        return results[0] if single else results


class RemoteEngine:
    """A predict run's engine (``inference.predict_run.LocalEngine``'s members) whose detections
    come from a server: ``hrnetdet predict --server URL`` writes the files a local run writes.
    The server runs the options it offers (score threshold, max detections, slicing, TTA); the
    classes filter is applied here, as a local run applies it after the model."""

    def __init__(self, client: Client):
        self.client = client
        self.info = client.info()  # asked once: the server's model does not change under a run
        self.categories = ["__background__", *self.info["categories"]]
        self.masks = bool(self.info["masks"])

    def category_ids(self) -> Optional[List[int]]:
        return list(self.info["category_ids"])

    def describe(self) -> Dict[str, Any]:
        return {"server": self.client.url, "server model": self.info["model"],
                "server backend": self.info.get("backend")}

    def place(self, options: Any, rank: int, world: int) -> Any:
        if not options.full_image:
            raise ValueError("--no-full-image is not offered by the server (its sliced inference keeps the full image)")
        return options

    def _options(self, options: Any) -> Dict[str, Any]:
        return {"score_thresh": options.score_thresh, "slice": options.slice, "overlap": options.overlap,
                "tta": options.tta or None, "masks": "rle" if self.masks else None}

    def predictions(self, items: List[str], options: Any, indices: List[int]) -> Any:
        """Results as ``iter_predictions`` yields them, with ``height`` and ``width`` instead of the
        image; an input the server refuses (or a video, which is not sent) is an error record."""
        from ..inference.predict import keep_detections
        from ..inference.sources import download, is_url, is_video

        label_ids = options.label_ids(self.categories)
        for index, item in zip(indices, items):
            base = {"input_index": index, "file_name": item}
            if is_video(item):
                yield {**base, "error": f"{item!r}: videos are not sent to a server (run them locally)"}
                continue
            try:
                path = download(item) if is_url(item) else item
            except ConnectionError as e:  # the input's URL, not the server
                yield {**base, "error": str(e)}
                continue
            try:
                answer = self.client.predict_record(path, max_det=None if label_ids else options.max_det,
                                                    **self._options(options))
            except RemoteError as e:
                if e.status not in (400, 413, 415):  # the server or the key, not this input: stop
                    raise
                yield {**base, "error": e.message.replace(repr(UPLOAD_NAME), repr(item))}
                continue
            except ConnectionError:
                raise
            except OSError as e:
                yield {**base, "error": f"cannot read {item!r}: {e}"}
                continue
            finally:
                if path != item:
                    os.remove(path)
            result = as_result(answer, masks=False)
            if self.masks:
                result["masks"] = [d["mask"] for d in answer["detections"]]
            if label_ids:  # as a local run: the classes first, then the best max_det of them
                result = keep_detections(result, label_ids, options.max_det)
                result["names"] = [self.categories[i] for i in result["labels"].tolist()]
            yield {**result, **base, "height": answer["height"], "width": answer["width"]}
