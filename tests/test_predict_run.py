"""The resumable ``hrnetdet predict`` run: results keyed by input and settings, an --out that cannot
overwrite inputs or write through planted links, per-input problems as counted skips, whole videos."""
import hashlib
import importlib
import json
import os

import numpy as np
import pytest
from PIL import Image

from hrnetdet.inference.options import PredictOptions
from test_predict import _run, _write_video

predict_module = importlib.import_module("hrnetdet.inference.predict")
predict_run = importlib.import_module("hrnetdet.inference.predict_run")


@pytest.fixture()
def reused_model(model, monkeypatch):
    """The CLI gets the module's model instead of rebuilding it from the checkpoint on each run
    (the same weights), keeping 5 detections per image (its mask head costs seconds at 100)."""
    monkeypatch.setattr(model.roi_heads, "detections_per_img", 5)
    monkeypatch.setattr("hrnetdet.zoo.factory.create_model", lambda *args, **kwargs: model)


@pytest.fixture()
def inference_calls(monkeypatch):
    """The number of images each model call got, in order."""
    calls = []
    real = predict_module.run_model
    monkeypatch.setattr(predict_module, "run_model",
                        lambda m, images, options: calls.append(len(images)) or real(m, images, options))
    return calls


def _images(folder, rgb, *names):
    folder.mkdir(exist_ok=True)
    for i, name in enumerate(names):
        Image.fromarray(np.roll(rgb, 12 * i, axis=1)).save(folder / name)


def _records(out):
    return json.loads((out / "results.json").read_text())


def _image_ids_by_file(out):
    ids = {}
    for r in _records(out):
        ids.setdefault(os.path.basename(r["file_name"]), set()).add(r["image_id"])
    return ids


def test_an_added_file_is_predicted_and_none_is_twice(reused_model, rgb, checkpoint, tmp_path, inference_calls, capsys):
    _images(tmp_path / "in", rgb, "b.jpg", "c.jpg")
    out = tmp_path / "out"
    assert _run([tmp_path / "in"], out, checkpoint) == 0
    _images(tmp_path / "in", rgb, "a.jpg")  # sorts first: shifts the others' positions
    capsys.readouterr()
    assert _run([tmp_path / "in"], out, checkpoint) == 0
    ids = _image_ids_by_file(out)
    assert sorted(ids) == ["a.jpg", "b.jpg", "c.jpg"] and all(len(v) == 1 for v in ids.values())
    assert len({min(v) for v in ids.values()}) == 3
    assert inference_calls == [1, 1, 1]  # b, c, then only a
    assert "2 already done in" in capsys.readouterr().out
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [os.path.basename(r["input"]) for r in lines] == ["a.jpg", "b.jpg", "c.jpg"]
    assert all(r["size"] > 0 and r["mtime_ns"] > 0 for r in lines)
    # a file that changed is a new input: redone, and still once in the results
    Image.fromarray(rgb[::-1].copy()).save(tmp_path / "in" / "c.jpg")
    os.utime(tmp_path / "in" / "c.jpg", ns=(1, 1))
    capsys.readouterr()
    assert _run([tmp_path / "in"], out, checkpoint) == 0
    assert "2 already done in" in capsys.readouterr().out
    assert inference_calls == [1, 1, 1, 1]
    assert all(len(v) == 1 for v in _image_ids_by_file(out).values())
    assert len((out / "results.jsonl").read_text().splitlines()) == 3
    # a rerun over fewer inputs: the folder holds this run's results, and says what it dropped
    assert _run([tmp_path / "in" / "a.jpg"], out, checkpoint) == 0
    assert set(_image_ids_by_file(out)) == {"a.jpg"} and "2 earlier results" in capsys.readouterr().out


def test_a_rerun_with_other_settings_is_refused_not_mixed(rgb, checkpoint, tmp_path, inference_calls):
    _images(tmp_path / "in", rgb, "a.jpg")
    out = tmp_path / "out"
    assert _run([tmp_path / "in"], out, checkpoint) == 0
    before = (out / "results.json").read_text()
    with pytest.raises(SystemExit, match=r"made with --score-thresh 0\.0; this run has --score-thresh 0\.5: "
                                         r"choose another --out, or delete .* to start afresh"):
        _run([tmp_path / "in"], out, checkpoint, "--score-thr", "0.5")
    with pytest.raises(SystemExit, match="--min-size"):
        _run([tmp_path / "in"], out, checkpoint, "--min-size", "64")
    assert inference_calls == [1] and (out / "results.json").read_text() == before


def test_an_out_folder_holding_an_input_is_refused_before_inference(rgb, checkpoint, tmp_path, monkeypatch):
    folder = tmp_path / "in"
    _images(folder, rgb, "a.png", "b.jpg")
    monkeypatch.setattr(predict_module, "run_model", lambda *a: pytest.fail("inference ran"))
    digests = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    with pytest.raises(SystemExit, match=r"--out .* holds the input .*a\.png.* choose another --out"):
        _run([folder], folder, checkpoint)
    link = tmp_path / "elsewhere.jpg"
    link.symlink_to(folder / "b.jpg")  # an input named from outside that resolves into --out
    with pytest.raises(SystemExit, match="holds the input"):
        _run([link], folder, checkpoint)
    assert {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()} == digests


def test_planted_links_in_out_are_never_written_through(reused_model, rgb, checkpoint, tmp_path):
    _images(tmp_path / "in", rgb, "a.jpg")
    out = tmp_path / "shared"
    out.mkdir()
    targets = {name: tmp_path / f"victim_{name}" for name in ("results.json", "a.jpg", "failed.txt")}
    for name, target in targets.items():
        target.write_text("precious")
        (out / name).symlink_to(target)
    assert _run([tmp_path / "in"], out, checkpoint) == 0
    assert all(t.read_text() == "precious" for t in targets.values())
    assert not any((out / name).is_symlink() for name in targets)
    assert _records(out) and Image.open(out / "a.jpg").size == (108, 72)
    # an append target cannot be replaced: the run is refused, the target untouched
    out2 = tmp_path / "shared2"
    out2.mkdir()
    (out2 / "run.json").write_bytes((out / "run.json").read_bytes())
    (out2 / "results.jsonl").symlink_to(targets["a.jpg"])
    with pytest.raises(SystemExit, match="^hrnetdet predict: error: cannot read .*results.jsonl is a symbolic link"):
        _run([tmp_path / "in"], out2, checkpoint)
    assert targets["a.jpg"].read_text() == "precious"


def test_a_tiny_image_is_a_counted_skip_naming_the_file(reused_model, rgb, checkpoint, tmp_path):
    _images(tmp_path / "in", rgb, "a.jpg")
    Image.fromarray(rgb[:1, :1].copy()).save(tmp_path / "in" / "tiny.png")
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="1 input.* could not be read"):
        assert _run([tmp_path / "in"], out, checkpoint) == 0
    failed = (out / "failed.txt").read_text().splitlines()
    assert len(failed) == 1 and failed[0].startswith(str(tmp_path / "in" / "tiny.png"))
    assert "1x1 pixels" in failed[0]
    assert set(_image_ids_by_file(out)) == {"a.jpg"}
    with pytest.raises(SystemExit, match=r"tiny\.png' is 1x1 pixels.*--strict"):
        _run([tmp_path / "in"], tmp_path / "strict", checkpoint, "--strict")


def test_a_run_where_no_input_succeeds_exits_non_zero(reused_model, rgb, checkpoint, tmp_path):
    (tmp_path / "in").mkdir()
    Image.fromarray(rgb[:1, :1].copy()).save(tmp_path / "in" / "tiny.png")
    (tmp_path / "in" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.warns(UserWarning), pytest.raises(SystemExit, match=r"^hrnetdet predict: error: no input could "
                                                                    r"be read \(2 failed, listed in .*failed\.txt\)$"):
        _run([tmp_path / "in"], tmp_path / "out", checkpoint)
    assert len((tmp_path / "out" / "failed.txt").read_text().splitlines()) == 2


def test_a_file_name_that_is_not_utf8_is_predicted_and_written(reused_model, rgb, checkpoint, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    name = os.fsdecode(b"\xff.png")  # a lone surrogate on a UTF-8 file system
    Image.fromarray(rgb).save(os.path.join(folder, name), format="PNG")
    with open(os.path.join(folder, os.fsdecode(b"\xfe.jpg")), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 truncated")
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="1 input"):
        assert _run([folder], out, checkpoint) == 0
    records = _records(out)  # the name's bytes come back from the JSON escapes
    assert records and {os.fsencode(r["file_name"]) for r in records} == {os.fsencode(str(folder)) + b"/\xff.png"}
    assert os.path.isfile(os.path.join(out, os.fsdecode(b"\xff.jpg")))
    assert (out / "failed.txt").read_text(encoding="utf-8").startswith(f"{folder}/\\udcfe.jpg\t")


def test_a_resumed_save_video_run_writes_the_video_whole(reused_model, rgb, checkpoint, tmp_path, monkeypatch):
    av = pytest.importorskip("av")
    frames = [np.roll(rgb, 4 * i, axis=1)[:64, :96].copy() for i in range(4)]
    _write_video(tmp_path / "clip.mp4", frames)
    out = tmp_path / "out"
    real, calls = predict_module.run_model, []

    def interrupted(m, images, mode):
        calls.append(len(images))
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C part way through the video
        return real(m, images, mode)
    monkeypatch.setattr(predict_module, "run_model", interrupted)
    with pytest.raises(SystemExit, match="interrupted"):
        _run([tmp_path / "clip.mp4"], out, checkpoint, "--save-video")
    assert not (out / "clip.mp4").exists()  # no truncated video beside the results
    assert _run([tmp_path / "clip.mp4"], out, checkpoint, "--save-video") == 0
    with av.open(str(out / "clip.mp4")) as container:
        assert sum(1 for _ in container.decode(video=0)) == 4
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [r.get("frame_index") for r in lines] == [0, 1, 2, 3, None]  # then the video's closing record
    assert lines[-1]["frames"] == 4 and lines[-1]["video"] == "clip.mp4"
    calls.clear()
    assert _run([tmp_path / "clip.mp4"], out, checkpoint, "--save-video") == 0
    assert calls == []  # done whole: nothing to redo


class _ElsewhereEngine(predict_run.LocalEngine):
    """An engine as a server's client or Ray feed the run: results without the decoded image, only
    its size, and a description of its own."""

    def describe(self):
        return {**super().describe(), "engine": "elsewhere"}

    def predictions(self, items, options, indices):
        for res in super().predictions(items, options, indices):
            image = res.pop("image", None)
            if image is not None:
                res["height"], res["width"] = image.shape[-2:]
            yield res


def test_an_engine_elsewhere_writes_what_a_local_run_writes(model, rgb, tmp_path, monkeypatch):
    monkeypatch.setattr(model.roi_heads, "detections_per_img", 5)
    _images(tmp_path / "in", rgb, "a.jpg", "b.png")
    (tmp_path / "in" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    paths = sorted(str(p) for p in (tmp_path / "in").iterdir())
    options = PredictOptions(score_thresh=0.0, num_workers=0)
    local, elsewhere = tmp_path / "local", tmp_path / "elsewhere"
    with pytest.warns(predict_run.UnreadableInputWarning):
        predict_run.run_predict(model, paths, str(local), options, progress=False)
    with pytest.warns(predict_run.UnreadableInputWarning):
        counts = predict_run.run_predict(_ElsewhereEngine(model), paths, str(elsewhere), options, progress=False)
    assert (counts["done"], counts["failed"]) == (2, 1)
    assert _records(elsewhere) == _records(local) and len(_records(local)) > 0
    for name in ("a.jpg", "b.jpg"):  # pictures drawn from the files, as the local run drew them
        assert (elsewhere / name).read_bytes() == (local / name).read_bytes()
    assert (elsewhere / "failed.txt").read_text() == (local / "failed.txt").read_text()
    assert json.loads((elsewhere / "run.json").read_text())["settings"]["engine"] == "elsewhere"
