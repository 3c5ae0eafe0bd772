"""The ``hrnetdet predict`` run over files: resumable, keyed by input, and all-or-something.

An output folder holds ``run.json`` (the settings that shape results: a rerun with other settings
is refused, never mixed), ``results.jsonl`` (one line per image, video frame and finished video,
appended as each is done, each carrying its input's identity: resolved path, size and mtime_ns, or
the URL), ``results.json`` (COCO results of this run's inputs, each once, written atomically at the
end), ``failed.txt`` (inputs that could not be read, and why) and the pictures and annotated videos.
A rerun into the same folder skips the inputs already done (a file that changed is redone); a
second run into it at the same time is refused (a lock file per rank). Under ``torchrun`` each rank
takes every WORLD_SIZE-th input and appends to ``results.rank{r}.jsonl``; rank 0 merges the parts
once every rank is done.

Every file in the folder is created without following a link someone planted there: appends and
the lock through ``open_no_follow`` or ``O_EXCL``, everything else through ``atomic_write``, which
replaces a link. Names that are not UTF-8 are written with their undecodable bytes as ``\\udcXX``
escapes (Python's surrogateescape code points; ``os.fsencode`` turns them back into the bytes).

What computes the detections is an *engine*: ``LocalEngine`` runs a detector in this process (a
model given to ``run_predict`` is wrapped in one); a remote server or a Ray cluster plugs in as
an object with the same four members (``categories``, ``category_ids``, ``describe``, ``place``,
``predictions``; see ``LocalEngine``), so every engine writes the same files and resumes the same way.
"""
import datetime
import json
import os
import socket
import tempfile
import warnings
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Set, Tuple

import torch
from torch import nn

from ..data.images import read_image, to_float
from ..data.results import category_ids_of, coco_records
from ..io import atomic_write, open_no_follow
from .options import PredictOptions, options_of
from .predict import iter_predictions
from .sources import is_url, is_video, video_rate
from .thresholds import score_threshold

RESULTS_JSONL = "results.jsonl"
RESULTS_JSON = "results.json"
FAILED_TXT = "failed.txt"
RUN_JSON = "run.json"
Identity = Tuple[str, Optional[int], Optional[int]]  # resolved path or URL, size, mtime_ns
Key = Tuple[Identity, int]  # (input identity, frame index; -1: the image, or the finished video)


class PredictRunError(RuntimeError):
    """A run that cannot start or must stop; the message names the file or folder."""


class UnreadableInputWarning(UserWarning):
    """Some inputs could not be read and were skipped (counted; listed in failed.txt)."""


def printable(text: str) -> str:
    """``text`` with the undecodable bytes of a non-UTF-8 file name as ``\\udcXX`` escapes, so a
    message or text file can always be written."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def write_file(path: str, write: Callable[[Any], None], mode: str = "w") -> None:
    """``write(file)`` into ``path``, atomically (``io.atomic_write``)."""
    def to_temporary(tmp: str) -> None:
        with open(tmp, mode) as f:
            write(f)
    atomic_write(path, to_temporary)


def input_identity(path: str) -> Dict[str, Any]:
    """What a result is keyed by: a file's resolved path with its size and mtime_ns (a changed file
    is a new input), or a URL as given."""
    if is_url(path):
        return {"input": path}
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError:
        return {"input": real}  # unreadable: its error record is redone on every rerun anyway
    return {"input": real, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _identity(record: Dict[str, Any]) -> Identity:
    return record["input"], record.get("size"), record.get("mtime_ns")


def _key(record: Dict[str, Any]) -> Key:
    return _identity(record), int(record.get("frame_index", -1))


def model_settings(model: nn.Module) -> Dict[str, Any]:
    """What of a detector object shapes its results: its class and test scale."""
    transform = getattr(model, "transform", None)
    return {"model class": type(model).__name__,
            "--min-size": getattr(transform, "min_size", None), "--max-size": getattr(transform, "max_size", None)}


def run_settings(engine: Any, options: PredictOptions, extra: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The settings that shape a run's results, named by their ``hrnetdet predict`` flags: the
    engine's ``describe()`` (a local model's test scale) and the options' ``fingerprint``;
    ``extra``: what the caller knows beyond the engine (the CLI: model name, weights identity, backend)."""
    settings = {**engine.describe(), **options.fingerprint(), **(extra or {})}
    return json.loads(json.dumps(settings))  # as run.json gives it back (tuples as lists)


# run.json keys that earlier versions wrote under a flag's old spelling: their folders still resume
OLD_SETTING_NAMES = {"--score-thr": "--score-thresh"}


def _recorded_settings(path: str) -> Optional[Dict[str, Any]]:
    """The settings in a ``run.json`` (old flag spellings read as today's); None when there is none."""
    try:
        with open_no_follow(path, "rb") as f:
            return {OLD_SETTING_NAMES.get(k, k): v for k, v in json.load(f)["settings"].items()}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise PredictRunError(f"{path} cannot be read ({e}): choose another --out, or delete "
                              f"{os.path.dirname(path)} to start afresh") from None


def check_settings(out: str, settings: Dict[str, Any]) -> None:
    """Record ``settings`` in ``out/run.json``, or refuse a folder whose results were made with
    other settings (or by a version of hrnetdet that recorded none): results are never mixed."""
    path = os.path.join(out, RUN_JSON)
    advice = f"choose another --out, or delete {out} to start afresh"
    recorded = _recorded_settings(path)
    if recorded is None and _part_files(out):
        recorded = _recorded_settings(path)  # another rank may have written it since
        if recorded is None:
            raise PredictRunError(f"{out} holds results of a run whose settings were not recorded "
                                  f"(no {RUN_JSON}): {advice}")
    if recorded is None:  # ranks may all write it: the same settings, atomically
        write_file(path, lambda f: f.write(json.dumps({"settings": settings}, indent=1) + "\n"))
        return
    differ = [k for k in sorted(set(recorded) | set(settings)) if recorded.get(k) != settings.get(k)]
    if differ:
        name = differ[0]
        raise PredictRunError(f"{out} holds results made with {name} {json.dumps(recorded.get(name))}; this run "
                              f"has {name} {json.dumps(settings.get(name))}: {advice}")


def check_out_holds_no_input(paths: Sequence[str], out: str) -> None:
    """Refuse an ``out`` folder that holds an input file: pictures and results written there could
    replace the inputs (``--out`` set to the input folder)."""
    folder = os.path.realpath(out)
    for path in paths:
        if is_url(path):
            continue
        parents = (os.path.dirname(os.path.realpath(path)), os.path.realpath(os.path.dirname(os.path.abspath(path))))
        if folder in parents:  # the file itself, or a link to it, in the folder
            raise PredictRunError(f"--out {out} holds the input {printable(path)}: pictures and results written "
                                  f"there could overwrite inputs; choose another --out")


class RunLock:
    """A lock file in the output folder (one per rank): a second run writing the same folder at the
    same time is refused; a lock left by a process that is gone (same host) is taken over."""

    def __init__(self, out: str, rank: int):
        self.path = os.path.join(out, f".predict.rank{rank}.lock")

    def __enter__(self) -> "RunLock":
        for _ in range(2):
            try:  # exclusive and not following links: a planted link or file counts as a held lock
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0), 0o644)
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
            with open_no_follow(self.path, "rb") as f:
                pid, host = f.read(256).decode().split()
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


class Line(NamedTuple):
    """Where a record is (file, byte offset) and what the run needs to know of it without reading it again."""
    path: str
    offset: int
    ok: bool
    video: Optional[str]  # a finished video's annotated file, when one was written


def _read_lines(path: str) -> Iterator[Tuple[int, Dict[str, Any]]]:
    """(offset, record) of each complete line of a jsonl file; a torn last line is skipped."""
    try:
        f = open_no_follow(path, "rb")
    except OSError as e:  # a link or FIFO planted in --out
        raise PredictRunError(f"cannot read {e}") from None
    with f:
        offset = 0
        for line in f:
            rec = _parsed(line) if line.endswith(b"\n") else None
            if isinstance(rec, dict):
                yield offset, rec
            offset += len(line)


def _parsed(line: bytes) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def _part_files(out: str) -> List[str]:
    parts = sorted(f for f in os.listdir(out) if f.startswith("results.rank") and f.endswith(".jsonl"))
    return [os.path.join(out, f) for f in ([RESULTS_JSONL] if os.path.lexists(os.path.join(out, RESULTS_JSONL)) else [])
            + parts]


def _index(out: str) -> Dict[Key, Line]:
    """Every record in the folder's jsonl files: key -> its line. A success beats an error for
    the same key; otherwise the later line wins."""
    index: Dict[Key, Line] = {}
    for path in _part_files(out):
        for offset, rec in _read_lines(path):
            if "input" not in rec:
                continue
            ok = "error" not in rec
            if ok or not (_key(rec) in index and index[_key(rec)].ok):
                index[_key(rec)] = Line(path, offset, ok, rec.get("video"))
    return index


def _done_inputs(index: Dict[Key, Line], out: str, save_video: bool) -> Set[Identity]:
    """Inputs with a result: an image's record, or a video's closing record (with ``save_video``,
    only when its annotated video was written whole)."""
    def video_written(line: Line) -> bool:
        return bool(line.video) and os.path.isfile(os.path.join(out, line.video))
    return {identity for (identity, frame), line in index.items() if frame == -1 and line.ok
            and not (save_video and is_video(identity[0]) and not video_written(line))}


def _repair(jsonl: Any, path: str) -> None:
    """Drop a torn last line (a run killed mid-write) of the open ``jsonl``, so that appending
    continues cleanly."""
    good = 0
    with open_no_follow(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            good += len(line)
    if good != os.fstat(jsonl.fileno()).st_size:
        os.ftruncate(jsonl.fileno(), good)


def _line(line: Line) -> bytes:
    with open_no_follow(line.path, "rb") as f:
        f.seek(line.offset)
        return f.readline()


def _ordered_keys(index: Dict[Key, Line], identities: Sequence[Dict[str, Any]]) -> List[Key]:
    """The keys of this run's inputs (``identities``, in order): each input's frames, then its
    closing record (-1) after them."""
    position: Dict[Identity, int] = {}
    for i, identity in enumerate(identities):
        position.setdefault(_identity(identity), i)
    return sorted((key for key in index if key[0] in position),
                  key=lambda key: (position[key[0]], key[1] if key[1] >= 0 else float("inf")))


def _write_coco(f: Any, records: Iterator[Dict[str, Any]], counts: Dict[str, int], failed: List[str]) -> None:
    """COCO results of ``records`` into ``f`` (``image_id``: the image's or frame's position);
    errors go to ``failed``, and ``counts`` counts records, detections and succeeded inputs."""
    f.write("[")
    first, image_id = True, 0
    for rec in records:
        if "error" in rec:
            failed.append(f"{printable(rec['file_name'])}\t{printable(rec['error'])}")
            continue
        counts["succeeded"] += "frame_index" not in rec  # an image's record, or a video's closing one
        if "detections" not in rec:
            continue  # a video's closing record
        counts["records"] += 1
        for det in rec["detections"]:
            det = {"image_id": image_id, "file_name": rec["file_name"], **det}
            if "frame_index" in rec:
                det["frame_index"] = rec["frame_index"]
            f.write(("" if first else ",") + json.dumps(det))
            first = False
            counts["detections"] += 1
        image_id += 1
    f.write("]")


def finish(out: str, identities: Sequence[Dict[str, Any]]) -> Dict[str, int]:
    """Merge every jsonl file of ``out`` into ``results.jsonl``: the records of this run's inputs
    (``identities``, in order; records of other inputs, or of an input's earlier content, are
    dropped), then write ``results.json`` (COCO results; ``image_id`` is the image's or frame's
    position) and ``failed.txt``, each atomically. Returns counts: records (images and frames done),
    detections, failed and succeeded inputs, and dropped (inputs whose records were dropped)."""
    index = _index(out)
    order = _ordered_keys(index, identities)
    kept = {identity for identity, _ in order}
    counts = {"records": 0, "detections": 0, "failed": 0, "succeeded": 0,
              "dropped": len({identity for identity, _ in index if identity not in kept})}
    failed: List[str] = []
    parts = _part_files(out)
    records = (json.loads(_line(index[key])) for key in order)
    write_file(os.path.join(out, RESULTS_JSON), lambda f: _write_coco(f, records, counts, failed))
    write_file(os.path.join(out, RESULTS_JSONL), lambda f: f.writelines(_line(index[key]) for key in order),
               mode="wb")  # in order, one line per key
    for path in parts:
        if os.path.basename(path) != RESULTS_JSONL:
            os.remove(path)
    write_file(os.path.join(out, FAILED_TXT), lambda f: f.write("".join(line + "\n" for line in failed)))
    counts["failed"] = len(failed)
    return counts


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
    """Annotated frames of the video ``source`` into an MP4 file ``path`` (PyAV, H.264 or MPEG-4;
    the file may have any name: ``atomic_write``'s temporary one)."""

    def __init__(self, path: str, source: str):
        from .sources import require_av
        self.av = require_av()
        self.path = path
        self.source = source
        self.container = None
        self.stream = None

    def write(self, frame: torch.Tensor) -> None:
        h, w = (int(frame.shape[1]) // 2) * 2, (int(frame.shape[2]) // 2) * 2  # yuv420p needs even sizes
        if self.container is None:
            from fractions import Fraction
            self.container = self.av.open(self.path, mode="w", format="mp4")
            codecs = self.av.codecs_available
            self.stream = self.container.add_stream("libx264" if "libx264" in codecs else "mpeg4",
                                                    rate=Fraction(video_rate(self.source)).limit_denominator(1001))
            self.stream.width, self.stream.height, self.stream.pix_fmt = w, h, "yuv420p"
        image = frame[:, :h, :w].permute(1, 2, 0).contiguous().numpy()
        for packet in self.stream.encode(self.av.VideoFrame.from_ndarray(image, format="rgb24")):
            self.container.mux(packet)

    def close(self) -> None:
        if self.container is not None:
            for packet in self.stream.encode():
                self.container.mux(packet)
            self.container.close()


class _VideoFailed(Exception):
    """A video stopped part way: its annotated file is dropped, not kept truncated."""


def _groups(indices: Sequence[int], paths: Sequence[str]) -> Iterator[List[int]]:
    """Runs of consecutive image inputs (decoded together, in workers), and each video alone."""
    run: List[int] = []
    for i in indices:
        if is_video(paths[i]):
            if run:
                yield run
                run = []
            yield [i]
        else:
            run.append(i)
    if run:
        yield run


class LocalEngine:
    """Detections computed in this process by ``model``: the engine of a local run.

    An engine's members, which other engines (a server's client, Ray) provide alike:
    ``categories`` (names of labels 1..K), ``category_ids()`` (the dataset id of each, or None),
    ``describe()`` (what shapes results beyond the options, for run.json), ``place(options, rank,
    world)`` (the options this rank runs with, the engine made ready for them) and
    ``predictions(items, options, indices)``: results as ``iter_predictions(...,
    with_images=True)`` yields them; a result without ``image`` carries ``height`` and ``width``
    (its picture is then drawn from the file)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.categories = list(getattr(model, "categories", None) or [])

    def category_ids(self) -> Optional[List[int]]:
        return category_ids_of(self.model)

    def describe(self) -> Dict[str, Any]:
        return model_settings(self.model)

    def place(self, options: PredictOptions, rank: int, world: int) -> PredictOptions:
        options = options.replace(device=_rank_device(self.model, options.device, rank, world))
        self.model.eval().to(torch.device(options.device))
        return options

    def predictions(self, items: Sequence[str], options: PredictOptions, indices: Sequence[int]
                    ) -> Iterator[Dict[str, Any]]:
        with score_threshold(self.model, options.score_thresh), torch.no_grad():
            yield from iter_predictions(self.model, items, options, indices=indices, with_images=True)


class _Job(NamedTuple):
    """What one rank's share of a run works with, fixed for the run."""
    engine: Any
    paths: Sequence[str]
    identities: Sequence[Dict[str, Any]]
    out: str
    options: PredictOptions
    strict: bool
    draw: bool
    save_video: bool


class _Run:
    """One rank's share of a run: predicts inputs and appends their records (images, frames,
    videos' closing records) to the open ``jsonl``, drawing pictures and annotated videos."""

    def __init__(self, job: _Job, jsonl: Any, counts: Dict[str, Any], bar: Any):
        self.job, self.jsonl, self.counts, self.bar = job, jsonl, counts, bar
        self.names = picture_names(job.paths)
        self.category_ids = job.engine.category_ids()

    def append(self, rec: Dict[str, Any]) -> None:
        self.jsonl.write((json.dumps(rec) + "\n").encode())
        self.jsonl.flush()

    def failed(self, rec: Dict[str, Any], error: str) -> None:
        """Append an input's error record, said on the console; stop the run under ``strict``."""
        from tqdm import tqdm

        self.counts["failed"] += 1
        tqdm.write(f"hrnetdet predict: skipped {printable(rec['file_name'])}: {printable(error)}")
        self.append({**rec, "error": error})
        if self.job.strict:
            raise PredictRunError(f"{printable(error)} (--strict)")

    def record(self, res: Dict[str, Any], video: Optional[_VideoWriter] = None) -> bool:
        """Append one result (or error) to the jsonl, drawing its picture; False for an error."""
        index = res["input_index"]
        image = res.pop("image", None)
        rec: Dict[str, Any] = {**self.job.identities[index], "file_name": self.job.paths[index]}
        if "error" in res:
            self.failed(rec, res["error"])
            return False
        if "frame_index" in res:
            rec.update(frame_index=res["frame_index"], timestamp=res["timestamp"])
        if image is None:  # an engine elsewhere: its size comes with the result, the picture from the file
            rec["height"], rec["width"] = int(res.pop("height")), int(res.pop("width"))
            if video is not None or (self.job.draw and "frame_index" not in res):
                image = read_image(self.job.paths[index], max_pixels=self.job.options.pixel_limit)
        else:
            rec["height"], rec["width"] = int(image.shape[-2]), int(image.shape[-1])
        rec["detections"] = [{k: v for k, v in det.items() if k != "image_id"}
                             for det in coco_records(res, 0, self.category_ids)]
        if video is not None:
            video.write(self.picture(image, res))
        elif self.job.draw and "frame_index" not in res:
            rec["picture"] = f"{self.names[index]}.jpg"
            write_jpeg(self.picture(image, res), os.path.join(self.job.out, rec["picture"]))
        self.append(rec)
        self.counts["done"] += 1
        self.counts["detections"] += len(rec["detections"])
        return True

    def picture(self, image: torch.Tensor, res: Dict[str, Any]) -> torch.Tensor:
        from ..visualize import draw
        return draw(image if image.dtype == torch.uint8 else to_float(image), res,
                    line_width=self.job.options.line_width, label_size=self.job.options.label_size)

    def predict(self, group: List[int], video: Optional[_VideoWriter] = None) -> int:
        """Record the results of the inputs ``group``; the number of records (frames)."""
        n = 0
        paths = self.job.paths
        for res in self.job.engine.predictions([paths[i] for i in group], self.job.options, group):
            if not self.record(res, video) and is_video(paths[res["input_index"]]):
                raise _VideoFailed()  # no closing record: the video is redone whole by a rerun
            n += 1
            if "frame_index" not in res:
                self.bar.update(1)
        return n

    def predict_video(self, i: int) -> None:
        """A video whole: its frames, its annotated video (written whole, atomically, or not at
        all) and a closing record that marks it done."""
        frames = 0

        def encode(tmp: str) -> None:
            nonlocal frames
            writer = _VideoWriter(tmp, self.job.paths[i])
            try:
                frames = self.predict([i], writer)
            finally:
                writer.close()
        video = f"{self.names[i]}.mp4"
        try:
            if self.job.save_video:
                atomic_write(os.path.join(self.job.out, video), encode)
            else:
                frames = self.predict([i])
        except _VideoFailed:
            return
        finally:
            self.bar.update(1)
        self.append({**self.job.identities[i], "file_name": self.job.paths[i], "frames": frames,
                     **({"video": video} if self.job.save_video else {})})

    def predict_all(self, indices: Sequence[int]) -> None:
        for group in _groups(indices, self.job.paths):
            if is_video(self.job.paths[group[0]]):
                self.predict_video(group[0])
            else:
                self.predict(group)


def write_jpeg(picture: torch.Tensor, path: str) -> None:
    """A CHW uint8 picture as a JPEG file, atomically (PIL: torchvision's writer takes no file
    object, and no name that is not UTF-8)."""
    from PIL import Image
    jpeg = Image.fromarray(picture.permute(1, 2, 0).numpy())
    write_file(path, lambda f: jpeg.save(f, "JPEG", quality=90), mode="wb")


def _unique_unfinished(identities: Sequence[Dict[str, Any]], shard: Sequence[int], done: Set[Identity]
                       ) -> Tuple[List[int], int, int]:
    """The inputs of ``shard`` to predict (each input's first listing, not done yet), and how many
    were listed twice and how many are done."""
    first: Dict[Identity, int] = {}
    for i, identity in enumerate(identities):
        first.setdefault(_identity(identity), i)
    unique = [i for i in shard if first[_identity(identities[i])] == i]
    mine = [i for i in unique if _identity(identities[i]) not in done]
    return mine, len(shard) - len(unique), len(unique) - len(mine)


def _writable_out(paths: Sequence[str], out: str) -> None:
    """Refuse an ``out`` that holds an input or cannot be written, before anything is predicted."""
    check_out_holds_no_input(paths, out)
    try:
        os.makedirs(out, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out, prefix=".write-test")
        probe.close()
    except OSError as e:
        raise PredictRunError(f"--out {out} is not writable: {e.strerror or e}") from None


def _rank_device(model: nn.Module, device: Optional[str], rank: int, world: int) -> str:
    """The device this rank runs on: ``device`` (default: the model's), one GPU per rank under torchrun."""
    if device is None:
        return str(next(model.parameters()).device)
    if torch.device(device).type == "cuda" and world > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', rank)) % torch.cuda.device_count()}"
    return device


def _open_append(path: str) -> Any:
    try:
        return open_no_follow(path, "ab")
    except OSError as e:
        raise PredictRunError(f"cannot append to {path}: {e}") from None


def _predict_share(job: _Job, counts: Dict[str, Any], rank: int, world: int, progress: bool) -> None:
    """This rank's inputs (every ``world``-th, those not done yet) predicted into its jsonl file."""
    from tqdm import tqdm

    mine, counts["duplicates"], counts["skipped"] = _unique_unfinished(
        job.identities, range(rank, len(job.paths), world), _done_inputs(_index(job.out), job.out, job.save_video))
    own = os.path.join(job.out, RESULTS_JSONL if world == 1 else f"results.rank{rank}.jsonl")
    jsonl = _open_append(own)
    bar = tqdm(total=len(mine), unit="input", disable=not progress or rank != 0, dynamic_ncols=True)
    try:
        _repair(jsonl, own)
        _Run(job, jsonl, counts, bar).predict_all(mine)
    finally:
        jsonl.close()
        bar.close()


def _merge(job: _Job, counts: Dict[str, Any], rank: int, world: int) -> None:
    """Once every rank is done, rank 0 merges the folder (``finish``) and counts what it holds."""
    import torch.distributed as dist

    if world > 1:
        dist.barrier()
    if rank == 0:
        merged = finish(job.out, job.identities)
        counts["succeeded"], counts["dropped"] = merged["succeeded"], merged["dropped"]
        if merged["failed"]:
            warnings.warn(f"{merged['failed']} input(s) could not be read and were skipped: listed in "
                          f"{os.path.join(job.out, FAILED_TXT)}", UnreadableInputWarning, stacklevel=4)
    if world > 1:
        dist.barrier()


def run_predict(model: Any, paths: Sequence[str], out: str, options: Optional[PredictOptions] = None, *,
                strict: bool = False, draw: bool = True, save_video: bool = False, progress: bool = True,
                settings: Optional[Dict[str, Any]] = None) -> Dict[str, Optional[int]]:
    """Predict every input of ``paths`` (expanded files, URLs, videos) into the folder ``out``
    (see the module's docstring) with ``model`` (a detector, or an engine: ``LocalEngine``) and
    ``options`` (``PredictOptions``; its fingerprint goes into run.json); ``settings``: what else
    identifies the results (``run_settings``'s ``extra``).
    Returns counts: done (images and frames), skipped (already done), duplicates (inputs listed
    twice), failed, detections, and on rank 0 succeeded (inputs with results in the folder) and
    dropped (inputs of earlier runs not in this one, or changed since: their results are dropped)."""
    engine = LocalEngine(model) if isinstance(model, nn.Module) else model
    options = options_of(options)
    options.label_ids(engine.categories)  # an unknown class: refused before any file
    rank, world, created_group = distributed_rank()
    _writable_out(paths, out)
    options = engine.place(options, rank, world)
    counts: Dict[str, Optional[int]] = {"done": 0, "skipped": 0, "duplicates": 0, "failed": 0, "detections": 0,
                                        "succeeded": None, "dropped": None}
    with RunLock(out, rank):
        check_settings(out, run_settings(engine, options, settings))
        job = _Job(engine, paths, [input_identity(p) for p in paths], out, options, strict, draw, save_video)
        _predict_share(job, counts, rank, world, progress)
        _merge(job, counts, rank, world)
    if created_group:
        import torch.distributed as dist
        dist.destroy_process_group()
    return counts
