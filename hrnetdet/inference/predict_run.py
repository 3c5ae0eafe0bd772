"""The ``hrnetdet predict`` run over files: resumable and all-or-something.

An output folder holds ``results.jsonl`` (one line per image or video frame, appended as each is
done), ``results.json`` (COCO results, written atomically at the end from the lines), ``failed.txt``
(inputs that could not be read) and the pictures. A rerun into the same folder skips what is
done; a second run into it at the same time is refused (a lock file per rank). Under
``torchrun`` each rank takes every WORLD_SIZE-th input and appends to ``results.rank{r}.jsonl``;
rank 0 merges the parts once every rank is done.
"""
import datetime
import json
import os
import socket
import tempfile
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import torch
from torch import nn

from ..data.images import to_float
from ..data.results import category_ids_of, coco_records
from ..io import atomic_write
from .predict import iter_predictions
from .sources import is_video, video_rate
from .thresholds import score_threshold

RESULTS_JSONL = "results.jsonl"
RESULTS_JSON = "results.json"
FAILED_TXT = "failed.txt"
Key = Tuple[int, int]  # (input index, frame index or -1)


class PredictRunError(RuntimeError):
    """A run that cannot start or must stop; the message names the file or folder."""


class UnreadableInputWarning(UserWarning):
    """Some inputs could not be read and were skipped (counted; listed in failed.txt)."""


def write_file(path: str, write: Callable[[Any], None], mode: str = "w") -> None:
    """``write(file)`` into ``path``, atomically (``io.atomic_write``)."""
    def to_temporary(tmp: str) -> None:
        with open(tmp, mode) as f:
            write(f)
    atomic_write(path, to_temporary)


class RunLock:
    """A lock file in the output folder (one per rank): a second run writing the same folder at the
    same time is refused; a lock left by a process that is gone (same host) is taken over."""

    def __init__(self, out: str, rank: int):
        self.path = os.path.join(out, f".predict.rank{rank}.lock")

    def __enter__(self) -> "RunLock":
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if not self._stale():
                    raise PredictRunError(self._held_message()) from None
                os.remove(self.path)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()} {socket.gethostname()}\n")
            return self
        raise PredictRunError(self._held_message())

    def _owner(self) -> Tuple[int, str]:
        try:
            with open(self.path) as f:
                pid, host = f.read().split()
            return int(pid), host
        except (OSError, ValueError):
            return -1, ""

    def _stale(self) -> bool:
        pid, host = self._owner()
        if host != socket.gethostname() or pid <= 0:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def _held_message(self) -> str:
        pid, host = self._owner()
        return (f"{os.path.dirname(self.path)} is being written by another hrnetdet predict (pid {pid} on "
                f"{host or 'an unknown host'}); wait for it or choose another --out (delete {self.path} "
                f"if that run is gone)")

    def __exit__(self, *exc: Any) -> None:
        if os.path.exists(self.path):
            os.remove(self.path)


def picture_names(paths: Sequence[str]) -> List[str]:
    """A unique picture name per input (its file stem, then ``stem_1``, ``stem_2``... when stems
    collide), decided over the whole input list so reruns and ranks agree."""
    taken: Set[str] = set()
    names = []
    for path in paths:
        stem = os.path.splitext(os.path.basename(path.split("?", 1)[0].rstrip("/")))[0] or "image"
        name, n = stem, 0
        while name in taken:
            n += 1
            name = f"{stem}_{n}"
        taken.add(name)
        names.append(name)
    return names


def _key(record: Dict[str, Any]) -> Key:
    return int(record["input_index"]), int(record.get("frame_index", -1))


def _read_lines(path: str) -> Iterator[Tuple[int, Dict[str, Any]]]:
    """(offset, record) of each complete line of a jsonl file; a torn last line is skipped."""
    with open(path, "rb") as f:
        offset = 0
        for line in f:
            if line.endswith(b"\n"):
                try:
                    yield offset, json.loads(line)
                except json.JSONDecodeError:
                    pass
            offset += len(line)


def _part_files(out: str) -> List[str]:
    parts = sorted(f for f in os.listdir(out) if f.startswith("results.rank") and f.endswith(".jsonl"))
    return [os.path.join(out, f) for f in ([RESULTS_JSONL] if os.path.exists(os.path.join(out, RESULTS_JSONL)) else [])
            + parts]


def _index(out: str) -> Dict[Key, Tuple[str, int, bool]]:
    """Every record in the folder's jsonl files: key -> (file, offset, ok). A success beats an
    error for the same key; otherwise the later line wins."""
    index: Dict[Key, Tuple[str, int, bool]] = {}
    for path in _part_files(out):
        for offset, rec in _read_lines(path):
            ok = "error" not in rec
            if ok or not index.get(_key(rec), ("", 0, False))[2]:
                index[_key(rec)] = (path, offset, ok)
    return index


def _repair(path: str) -> None:
    """Drop a torn last line (a run killed mid-write), so that appending continues cleanly."""
    if not os.path.exists(path):
        return
    good = 0
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            good += len(line)
    if good != os.path.getsize(path):
        with open(path, "r+b") as f:
            f.truncate(good)


def _line(path: str, offset: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.readline()


def finish(out: str) -> Tuple[int, int, int]:
    """Merge every jsonl file of ``out`` into ``results.jsonl`` (input order), write
    ``results.json`` (COCO results; ``image_id`` is the record's position) and ``failed.txt``,
    each atomically. Returns (records done, detections, failed inputs)."""
    index = _index(out)
    order = sorted(index)
    parts = _part_files(out)
    done = detections = 0
    failed: List[str] = []

    def write_jsonl(f: Any) -> None:
        for key in order:
            path, offset, _ = index[key]
            f.write(_line(path, offset))

    def write_json(f: Any) -> None:
        nonlocal done, detections
        f.write("[")
        first = True
        for image_id, key in enumerate(order):
            path, offset, ok = index[key]
            rec = json.loads(_line(path, offset))
            if not ok:
                failed.append(f"{rec['file_name']}\t{rec['error']}")
                continue
            done += 1
            for det in rec["detections"]:
                det = {"image_id": image_id, "file_name": rec["file_name"], **det}
                if "frame_index" in rec:
                    det["frame_index"] = rec["frame_index"]
                f.write(("" if first else ",") + json.dumps(det))
                first = False
                detections += 1
        f.write("]")

    write_file(os.path.join(out, RESULTS_JSON), write_json)
    write_file(os.path.join(out, RESULTS_JSONL), write_jsonl, mode="wb")  # in order, one line per key
    for path in parts:
        if os.path.basename(path) != RESULTS_JSONL:
            os.remove(path)
    write_file(os.path.join(out, FAILED_TXT), lambda f: f.write("".join(line + "\n" for line in failed)))
    return done, detections, len(failed)


def distributed_rank() -> Tuple[int, int, bool]:
    """(rank, world size, whether this call created the process group) under torchrun, with a gloo
    process group for the final barrier; (0, 1, False) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    import torch.distributed as dist
    created = not dist.is_initialized()
    if created:
        # Ranks finish at different times: the barrier waits as long as the slowest rank works.
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    return dist.get_rank(), dist.get_world_size(), created


class _VideoWriter:
    """Annotated frames of one video into an MP4 file (PyAV, H.264 or MPEG-4)."""

    def __init__(self, path: str, rate: float):
        from .sources import require_av
        self.av = require_av()
        self.path = path
        self.rate = rate
        self.container = None
        self.stream = None

    def write(self, frame: torch.Tensor) -> None:
        h, w = (int(frame.shape[1]) // 2) * 2, (int(frame.shape[2]) // 2) * 2  # yuv420p needs even sizes
        if self.container is None:
            from fractions import Fraction
            self.container = self.av.open(self.path, mode="w")
            codecs = self.av.codecs_available
            self.stream = self.container.add_stream("libx264" if "libx264" in codecs else "mpeg4",
                                                    rate=Fraction(self.rate).limit_denominator(1001))
            self.stream.width, self.stream.height, self.stream.pix_fmt = w, h, "yuv420p"
        image = frame[:, :h, :w].permute(1, 2, 0).contiguous().numpy()
        for packet in self.stream.encode(self.av.VideoFrame.from_ndarray(image, format="rgb24")):
            self.container.mux(packet)

    def close(self) -> None:
        if self.container is not None:
            for packet in self.stream.encode():
                self.container.mux(packet)
            self.container.close()


def run_predict(model: nn.Module, paths: Sequence[str], out: str, *, score_thresh: Optional[float] = None,
                batch_size: int = 1, device: Optional[str] = None, num_workers: Optional[int] = None,
                half: bool = False, strict: bool = False, draw: bool = True, save_video: bool = False,
                progress: bool = True, mode: Optional[Dict[str, Any]] = None) -> Dict[str, int]:
    """Predict every input of ``paths`` (expanded files, URLs, videos) into the folder ``out``
    (see the module's docstring); ``mode``: sliced inference or TTA settings (``modes.detect``).
    Returns counts: done, skipped (already done), failed, detections."""
    from torchvision.io import write_jpeg
    from tqdm import tqdm

    import torch.distributed as dist

    from ..visualize import draw as draw_picture

    rank, world, created_group = distributed_rank()
    try:
        os.makedirs(out, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out, prefix=".write-test")
        probe.close()
    except OSError as e:
        raise PredictRunError(f"--out {out} is not writable: {e.strerror or e}") from None
    if device is not None and torch.device(device).type == "cuda" and world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank)) % torch.cuda.device_count()}"
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval().to(dev)
    names = picture_names(paths)
    category_ids = category_ids_of(model)
    own = os.path.join(out, RESULTS_JSONL if world == 1 else f"results.rank{rank}.jsonl")
    counts = {"done": 0, "skipped": 0, "failed": 0, "detections": 0}
    with RunLock(out, rank):
        _repair(own)
        done = {key for key, (_, _, ok) in _index(out).items() if ok}
        mine = [i for i in range(rank, len(paths), world)
                if is_video(paths[i]) or (i, -1) not in done]
        counts["skipped"] = len(range(rank, len(paths), world)) - len(mine)
        videos: Dict[int, _VideoWriter] = {}
        bar = tqdm(total=len(mine), unit="input", disable=not progress or rank != 0, dynamic_ncols=True)
        try:
            with score_threshold(model, score_thresh), open(own, "a") as jsonl, torch.no_grad():
                stream = iter_predictions(model, [paths[i] for i in mine], indices=mine, batch_size=batch_size,
                                          device=dev, num_workers=num_workers, half=half,
                                          with_images=True, mode=mode)
                last_input = -1
                for res in stream:
                    index = res["input_index"]
                    if index != last_input:
                        bar.update(1)
                        last_input = index
                    if _key(res) in done:
                        continue  # a video frame done by an earlier run
                    image = res.pop("image", None)
                    rec: Dict[str, Any] = {"input_index": index, "file_name": res["file_name"]}
                    if "error" in res:
                        rec["error"] = res["error"]
                        counts["failed"] += 1
                        tqdm.write(f"hrnetdet predict: skipped {res['file_name']}: {res['error']}")
                        jsonl.write(json.dumps(rec) + "\n")
                        jsonl.flush()
                        if strict:
                            raise PredictRunError(f"{res['error']} (--strict)")
                        continue
                    if "frame_index" in res:
                        rec.update(frame_index=res["frame_index"], timestamp=res["timestamp"])
                    rec["height"], rec["width"] = int(image.shape[-2]), int(image.shape[-1])
                    detections = coco_records(res, 0, category_ids)
                    for det in detections:
                        del det["image_id"]
                    rec["detections"] = detections
                    if draw or save_video:
                        picture = draw_picture(image if image.dtype == torch.uint8 else to_float(image), res)
                        if "frame_index" not in res:
                            rec["picture"] = f"{names[index]}.jpg"
                            write_jpeg(picture, os.path.join(out, rec["picture"]), quality=90)
                        elif save_video:
                            if index not in videos:
                                videos[index] = _VideoWriter(os.path.join(out, f"{names[index]}.mp4"),
                                                             video_rate(paths[index]))
                            videos[index].write(picture)
                    jsonl.write(json.dumps(rec) + "\n")
                    jsonl.flush()
                    counts["done"] += 1
                    counts["detections"] += len(detections)
        finally:
            for writer in videos.values():
                writer.close()
            bar.close()
        if world > 1:
            dist.barrier()
        if rank == 0:
            _, _, failed = finish(out)
            if failed:
                warnings.warn(f"{failed} input(s) could not be read and were skipped: listed in "
                              f"{os.path.join(out, FAILED_TXT)}", UnreadableInputWarning, stacklevel=2)
        if world > 1:
            dist.barrier()
    if created_group:
        dist.destroy_process_group()
    return counts
