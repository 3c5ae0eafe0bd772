"""hrnetdet on Ray Data (``hrnetdet.integrations.ray``), on one local Ray of 2 CPUs shared by the
file: actors load the model from a folder the test writes; their results equal the local
``predict``'s image by image, whether rows hold arrays, encoded bytes or paths (``hrnetdet predict
--engine ray`` writes a local run's files); unreadable rows are error rows; an actor that dies
mid-run leaves every image done exactly once. 86-112 s on a 2-core machine at load average 10-13: Ray's
start and each actor's (a Python process building the model) dominate."""
import json
import os
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

ray = pytest.importorskip("ray")

import hrnetdet.integrations.ray as hrnetdet_ray  # noqa: E402
from conftest import PREDICT_ARCH, PREDICT_SMALL  # noqa: E402

SCORE_THRESH = 0.0
pytestmark = pytest.mark.timeout(600)  # a Ray that waits for resources waits for ever: fail instead


@pytest.fixture(scope="module")
def cluster():
    """One local Ray for the file (it takes seconds to start), without usage reports or dashboard;
    its workers inherit this process's environment (PYTHONPATH: this checkout's code)."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def saved(rgb, tmp_path_factory):
    """A calibrated small Mask R-CNN (5 detections per image) saved as a folder ``create_model`` and
    ``hrnetdet predict --model`` read, so that every actor loads the same weights."""
    import hrnetdet
    from calibrate import calibrate
    from hrnetdet.inference import load_image
    from hrnetdet.zoo.checkpoint import save_pretrained

    torch.manual_seed(0)
    model = calibrate(hrnetdet.create_model(PREDICT_ARCH, **PREDICT_SMALL, detections_per_img=5), [load_image(rgb)])
    folder = tmp_path_factory.mktemp("model")
    save_pretrained(model, str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def images(rgb, tmp_path_factory):
    """Six images of two sizes in a folder, and a file that is not an image."""
    folder = tmp_path_factory.mktemp("images")
    for i in range(6):
        picture = np.roll(rgb, 12 * i, axis=1) if i % 2 else np.ascontiguousarray(np.roll(rgb, 9 * i, axis=0)[:, :80])
        Image.fromarray(picture).save(folder / f"im{i}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return folder


def _paths(images):
    return sorted(str(p) for p in images.iterdir() if p.name.startswith("im"))


@pytest.fixture(scope="module")
def local(saved, images):
    """The local ``predict``'s result of each image, by file name."""
    import hrnetdet
    model = hrnetdet.create_model(saved)
    results = hrnetdet.predict(model, _paths(images), score_thresh=SCORE_THRESH, mask_format="rle")
    return {os.path.basename(r["file_name"]): r for r in results}


def _assert_same(row, res):
    assert row["error"] is None
    assert np.allclose(np.asarray(row["boxes"], dtype=np.float32).reshape(-1, 4), res["boxes"].numpy(), atol=1e-4)
    assert row["labels"] == res["labels"].tolist() and row["names"] == res["names"]
    assert np.allclose(row["scores"], res["scores"].numpy(), atol=1e-5)
    assert row["masks"] == res["masks"]  # RLEs equal: the same pixels
    assert len(row["boxes"]) == 5


def test_rows_of_arrays_equal_the_local_predict(cluster, saved, images, local):
    """Rows of arrays (a tiny one unreadable); rows of bytes: the next test, of paths: the CLI's."""
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in _paths(images)] + [np.zeros((4, 6, 3), np.uint8)]
    ds = ray.data.from_items([{"id": i, "image": a} for i, a in enumerate(arrays)])
    rows = sorted(hrnetdet_ray.predict_dataset(ds, saved, score_thresh=SCORE_THRESH, batch_size=3).take_all(),
                  key=lambda r: r["id"])
    assert [r["id"] for r in rows] == list(range(7)) and "image" not in rows[0]
    for row, name in zip(rows, sorted(local)):
        _assert_same(row, local[name])
        assert (row["height"], row["width"]) == (72, 108 if name[2] in "135" else 80)
    assert "is 6x4 pixels; images need at least 8 on each side" in rows[-1]["error"]
    assert rows[-1]["boxes"] == [] and rows[-1]["height"] is None
    ids = {cid for r in rows for cid in r["category_ids"]}
    assert ids and ids <= set(range(1, 91))  # COCO's ids (the model's categories), as results.json has them


class DyingPredictor(hrnetdet_ray.Predictor):
    """A Predictor whose actor process dies (``os._exit``) in its second call, once in the whole
    run (the first to create ``died`` dies), logging each start and each call into ``log``."""

    def __init__(self, model, *, log, **kwargs):
        super().__init__(model, **kwargs)
        self.log, self.calls = log, 0
        self._note("start")

    def _note(self, what):
        with open(os.path.join(self.log, f"{what}.{os.getpid()}.{self.calls}"), "w") as f:
            f.write(str(torch.get_num_threads()))

    def __call__(self, batch):
        self.calls += 1
        self._note("call")
        if self.calls == 2:
            try:
                os.close(os.open(os.path.join(self.log, "died"), os.O_CREAT | os.O_EXCL))
                os._exit(1)
            except FileExistsError:
                pass
        return super().__call__(batch)


def test_an_actor_that_dies_mid_run_leaves_every_image_done_once(cluster, saved, images, local, tmp_path):
    """Rows of bytes read by Ray (one not an image), one a call, on two actors; one dies in its second call."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # actors cannot import tests/
    # read first: the two actors hold both CPUs, and Ray's read tasks would wait for one for ever
    ds = ray.data.read_binary_files(str(images), include_paths=True).materialize()
    start = time.monotonic()
    rows = ds.map_batches(DyingPredictor, fn_constructor_args=(saved,),
                          fn_constructor_kwargs=dict(log=str(tmp_path), score_thresh=SCORE_THRESH),
                          batch_size=1, num_cpus=1, compute=ray.data.ActorPoolStrategy(size=2)).take_all()
    seconds = time.monotonic() - start
    log = os.listdir(tmp_path)
    starts, calls = [f for f in log if f.startswith("start.")], [f for f in log if f.startswith("call.")]
    assert "died" in log and len(starts) >= 3  # two actors, and one restarted in place of the dead
    assert {(tmp_path / f).read_text() for f in starts} == {"1"}  # torch threads: the actor's one CPU
    assert len(calls) >= 8  # 7 batches of one row, and the one the dead actor held, run again
    names = sorted(os.path.basename(r["path"]) for r in rows)
    assert names == sorted([*local, "broken.jpg"])  # every image once, none lost, none twice
    for row in rows:
        name = os.path.basename(row["path"])
        if name == "broken.jpg":
            assert row["error"] == f"cannot read {row['path']!r} as an image: Truncated File Read"
            assert row["boxes"] == [] and row["height"] is None
        else:
            _assert_same(row, local[name])
            assert (row["height"], row["width"]) == (72, 108 if name[2] in "135" else 80)
    assert "bytes" not in rows[0]
    print(f"\n7 images (1 unreadable), 2 actors, {len(starts)} actor starts, 1 killed, {len(calls)} calls "
          f"({len(calls) - 7} retried), {seconds:.1f} s")


def test_the_cli_engine_ray_writes_what_a_local_run_writes(cluster, saved, images, tmp_path):
    from hrnetdet.cli import main
    from hrnetdet.inference.predict_run import UnreadableInputWarning

    inputs = [str(images / name) for name in ("im0.png", "im1.png", "broken.jpg")]
    run = ["predict", *inputs, "--model", saved, "--score-thresh", "0", "--num-workers", "0"]
    for out, engine in ((tmp_path / "local", []), (tmp_path / "ray", ["--engine", "ray", "--ray-actors", "1"])):
        with pytest.warns(UnreadableInputWarning):
            assert main(run + ["--out", str(out)] + engine) == 0
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    for name in ("results.json", "results.jsonl", "failed.txt", "run.json", "im0.jpg", "im1.jpg"):
        assert (on_ray / name).read_bytes() == (local / name).read_bytes(), name
    assert len((local / "failed.txt").read_text().splitlines()) == 1
    assert len(json.loads((local / "results.json").read_text())) == 10  # 2 images x 5 detections


def test_the_cli_says_what_engine_ray_needs(saved, images, tmp_path, monkeypatch, capsys):
    from hrnetdet.cli import main

    run = ["predict", str(images / "im0.png"), "--model", saved, "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as e:
        main(run + ["--ray-actors", "2"])
    assert e.value.code == 2 and "argument --ray-actors: needs --engine ray" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    monkeypatch.delitem(sys.modules, "hrnetdet.integrations.ray")
    with pytest.raises(SystemExit, match=r"^hrnetdet predict: error: --engine ray: hrnetdet.integrations.ray needs "
                                         r"Ray Data: pip install 'hrnetdet\[ray\]'$"):
        main(run + ["--engine", "ray"])
    assert not (tmp_path / "out").exists()


def test_a_video_is_an_error_on_engine_ray_and_starts_no_actor(saved):
    import hrnetdet
    from hrnetdet.inference.options import PredictOptions

    engine = hrnetdet_ray.RayEngine(hrnetdet.create_model(saved), {"model": saved})
    results = list(engine.predictions(["clip.mp4"], PredictOptions(), [3]))  # no Ray: none is started
    assert results == [{"input_index": 3, "file_name": "clip.mp4",
                        "error": "'clip.mp4' is a video: hrnetdet's Ray predictor takes images"}]
