"""Predict's options as one record: bad values refused before any input is read (CLI and API, one
line naming the field), the class filter and max_det, labels that follow the box, the old flag
spellings, and --max-pixels reaching the decoder."""
import importlib
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

import hrnetdet
from hrnetdet.cli import build_parser, main
from hrnetdet.data.images import read_image
from hrnetdet.inference.options import OptionError, PredictOptions
from hrnetdet.visualize import draw

from test_predict import ARCH

predict_module = importlib.import_module("hrnetdet.inference.predict")


def _predict(inputs, out, checkpoint, *extra):
    return main(["predict", *map(str, inputs), "--model", ARCH, "--checkpoint", str(checkpoint),
                 "--out", str(out), "--min-size", "96", "--max-size", "128", *extra])


@pytest.fixture()
def image_file(rgb, tmp_path):
    path = tmp_path / "in" / "a.png"
    path.parent.mkdir()
    Image.fromarray(rgb).save(path)
    return path


@pytest.fixture()
def nothing_runs(monkeypatch):
    """Any model build, decode or inference fails the test: a refusal must come first."""
    monkeypatch.setattr("hrnetdet.zoo.factory.create_model", lambda *a, **k: pytest.fail("model built"))
    monkeypatch.setattr(predict_module, "run_model", lambda *a: pytest.fail("inference ran"))
    monkeypatch.setattr(predict_module.ImageInputs, "__getitem__", lambda *a: pytest.fail("input read"))


@pytest.mark.parametrize("flags, named", [
    (["--score-thresh", "2"], "--score-thresh"), (["--score-thr", "-0.5"], "--score-thresh"),
    (["--overlap", "1.5"], "--overlap"), (["--workers", "-1"], "--num-workers"),
    (["--max-det", "0"], "--max-det"), (["--line-width", "0"], "--line-width"),
    (["--label-size", "-3"], "--label-size"), (["--max-pixels", "-1"], "--max-pixels"),
    (["--batch-size", "0"], "--batch-size"), (["--slice", "32", "--tta"], "--tta"),
])
def test_cli_refuses_bad_values_before_the_model_or_any_input(flags, named, image_file, checkpoint, tmp_path,
                                                              nothing_runs, capsys):
    with pytest.raises(SystemExit) as e:
        _predict([image_file], tmp_path / "out", checkpoint, *flags)
    message = capsys.readouterr().err
    assert e.value.code == 2 and message.startswith(f"hrnetdet predict: error: argument {named}: ")
    assert message.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fields, named", [
    (dict(score_thresh=2.0), "score_thresh"), (dict(overlap=1.5), "overlap"), (dict(num_workers=-1), "num_workers"),
    (dict(max_det=0), "max_det"), (dict(max_pixels=-1), "max_pixels"), (dict(mask_format="png"), "mask_format"),
    (dict(classes=["unicorn"]), "classes"), (dict(classes=[0]), "classes"), (dict(slice=0), "slice"),
])
def test_api_refuses_bad_values_before_any_input(fields, named, model, image_file, nothing_runs):
    with pytest.raises(OptionError, match=rf"^{named} ") as e:
        hrnetdet.predict(model, str(image_file), **fields)
    assert e.value.field == named
    with pytest.raises(OptionError, match=rf"^{named} "):  # the record alone checks the same
        PredictOptions(**fields).label_ids(model.categories)


def test_unknown_class_is_refused_by_the_cli_before_any_input(model, image_file, checkpoint, tmp_path, monkeypatch,
                                                              capsys):
    monkeypatch.setattr("hrnetdet.zoo.factory.create_model", lambda *a, **k: model)
    monkeypatch.setattr(predict_module, "run_model", lambda *a: pytest.fail("inference ran"))
    with pytest.raises(SystemExit) as e:
        _predict([image_file], tmp_path / "out", checkpoint, "--classes", "person", "unicorn")
    assert e.value.code == 2
    assert re.fullmatch(r"hrnetdet predict: error: argument --classes: must be classes of the model "
                        r"\(person, bicycle, .*\), got unicorn\n", capsys.readouterr().err)


def _as_tuples(res):
    return [(tuple(b), int(lab), float(s)) for b, lab, s in
            zip(res["boxes"].tolist(), res["labels"].tolist(), res["scores"].tolist())]


def test_classes_and_max_det_keep_exactly_those_of_the_unfiltered_run(model, rgb, monkeypatch):
    monkeypatch.setattr(model.roi_heads, "detections_per_img", 20)
    full = hrnetdet.predict(model, rgb, score_thresh=0.0)
    labels = full["labels"].tolist()
    assert len(set(labels)) >= 3 and len(labels) >= 6
    wanted = sorted(set(labels))[:2]
    names = [model.categories[wanted[0]], wanted[1]]  # a name and a label id
    kept = hrnetdet.predict(model, rgb, score_thresh=0.0, classes=names)
    assert _as_tuples(kept) == [t for t in _as_tuples(full) if t[1] in wanted]
    assert kept["masks"].shape[0] == len(kept["labels"]) and len(kept["names"]) == len(kept["labels"])
    full_masks = {t: m for t, m in zip(_as_tuples(full), full["masks"])}
    assert all(torch.equal(full_masks[t], m) for t, m in zip(_as_tuples(kept), kept["masks"]))
    best = hrnetdet.predict(model, rgb, score_thresh=0.0, max_det=4, mask_format="rle")
    top = sorted(_as_tuples(full), key=lambda t: -t[2])[:4]
    assert sorted(_as_tuples(best), key=lambda t: -t[2]) == top and len(best["masks"]) == 4


def test_cli_filters_and_records_the_filter_in_run_json(model, image_file, checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(model.roi_heads, "detections_per_img", 20)
    monkeypatch.setattr("hrnetdet.zoo.factory.create_model", lambda *a, **k: model)
    full = hrnetdet.predict(model, str(image_file), score_thresh=0.0)
    name = model.categories[int(full["labels"][0])]
    out = tmp_path / "out"
    assert _predict([image_file], out, checkpoint, "--score-thresh", "0", "--classes", name, "--max-det", "2",
                    "--no-draw") == 0
    records = json.loads((out / "results.json").read_text())
    assert 1 <= len(records) <= 2 and {r["category_name"] for r in records} == {name}
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert settings["--classes"] == [name] and settings["--max-det"] == 2
    with pytest.raises(SystemExit, match=r"made with --max-det 2; this run has --max-det 3"):
        _predict([image_file], out, checkpoint, "--score-thresh", "0", "--classes", name, "--max-det", "3")


def test_a_folder_of_an_earlier_version_resumes(model, image_file, checkpoint, tmp_path, monkeypatch, capsys):
    """run.json written under the old flag spelling (--score-thr) is read as today's: nothing redone."""
    monkeypatch.setattr("hrnetdet.zoo.factory.create_model", lambda *a, **k: model)
    out = tmp_path / "out"
    assert _predict([image_file], out, checkpoint, "--score-thresh", "0.5", "--no-draw") == 0
    run = json.loads((out / "run.json").read_text())
    run["settings"] = {("--score-thr" if k == "--score-thresh" else k): v for k, v in run["settings"].items()
                       if k not in ("--classes", "--max-det")}  # keys earlier versions did not write
    (out / "run.json").write_text(json.dumps(run))
    monkeypatch.setattr(predict_module, "run_model", lambda *a: pytest.fail("inference ran"))
    capsys.readouterr()
    assert _predict([image_file], out, checkpoint, "--score-thr", "0.5", "--no-draw") == 0
    assert "1 already done" in capsys.readouterr().out


def _band_above(picture, x, y):
    """Height of the drawn label band: contiguous changed rows right above the point (x, y)."""
    changed = (picture[:, :y, x:x + 4] > 0).any(0).any(1)
    rows = 0
    while rows < y and changed[y - 1 - rows]:
        rows += 1
    return rows


def test_label_height_follows_the_box_within_limits():
    height, width = 2000, 3000
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    result = {"boxes": torch.tensor([[500.0, 1000.0, 530.0, 1030.0], [1500.0, 900.0, 2300.0, 1700.0]]),
              "labels": torch.tensor([1, 2]), "scores": torch.tensor([0.9, 0.8]), "names": ["car", "truck"]}
    pic = draw(image, result)
    small, big = _band_above(pic, 502, 1000), _band_above(pic, 1502, 900)
    assert 8 <= small <= 20  # a 30 px object keeps a small label (it was about 60 px)
    assert 40 <= big <= height / 30 + 20  # a big box's label is bigger, up to a fraction of the picture
    fixed = draw(image, result, label_size=24, line_width=2)
    assert abs(_band_above(fixed, 502, 1000) - _band_above(fixed, 1502, 900)) <= 1
    assert 18 <= _band_above(fixed, 502, 1000) <= 32


def test_old_spellings_are_hidden_aliases():
    parser = build_parser()
    args = parser.parse_args(["predict", "x.jpg", "--model", ARCH, "--score-thr", "0.6", "--workers", "3"])
    assert args.score_thresh == 0.6 and args.num_workers == 3
    args = parser.parse_args(["predict", "x.jpg", "--model", ARCH])
    assert args.score_thresh == 0.3 and args.num_workers is None
    predict_parser = parser._subparsers._group_actions[0].choices["predict"]
    shown = predict_parser.format_help()
    assert "--score-thresh" in shown and "--num-workers" in shown and "--max-det" in shown
    assert "--score-thr " not in shown and "--workers" not in shown


def test_max_pixels_reaches_the_decoder(model, rgb, image_file, checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("hrnetdet.zoo.factory.create_model", lambda *a, **k: model)
    big = image_file.parent / "big.png"
    Image.fromarray(np.kron(rgb, np.ones((2, 2, 1), dtype=np.uint8))).save(big)  # 144 x 216
    out = tmp_path / "out"
    assert _predict([image_file, big], out, checkpoint, "--max-pixels", "10000", "--no-draw") == 0
    assert "1 unreadable" in capsys.readouterr().out
    failed = (out / "failed.txt").read_text().splitlines()
    assert len(failed) == 1 and failed[0].startswith(str(big)) and "over the limit of 0.0 megapixels" in failed[0]
    # 0: no limit, PIL's own included (here made smaller than the image)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ValueError, match="PIL's own limit"):
        read_image(str(big), max_pixels=None)
    assert hrnetdet.predict(model, str(big), max_pixels=0)["boxes"].shape[1] == 4
    assert Image.MAX_IMAGE_PIXELS is None
