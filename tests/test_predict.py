"""predict / draw API and the ``hrnetdet predict`` command."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import hrnetdet
from hrnetdet.cli import main
from calibrate import calibrate
from hrnetdet.inference import expand_inputs, load_image, match_detections
from hrnetdet.inference.match import MIN_MATCHED
from hrnetdet.zoo.checkpoint import save_pretrained

SMALL = dict(min_size=96, max_size=128, rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=100)
ARCH = "mask_rcnn_hrnetv2p_w18"


@pytest.fixture(scope="module")
def rgb():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)  # blocky, so calibration sees structure
    return np.kron(base, np.ones((12, 12, 1), dtype=np.uint8))  # 72 x 108


@pytest.fixture(scope="module")
def model(rgb):
    torch.manual_seed(0)
    return calibrate(hrnetdet.create_model(ARCH, **SMALL), [load_image(rgb)])


@pytest.fixture(scope="module")
def folder(tmp_path_factory, rgb):
    d = tmp_path_factory.mktemp("imgs")
    Image.fromarray(rgb).save(d / "a.png")
    Image.fromarray(rgb[:, ::-1].copy()).save(d / "b.jpg")
    (d / "notes.txt").write_text("not an image")
    return d


def test_load_image_accepts_every_kind_and_agrees(folder, rgb):
    ref = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    for x in (rgb, Image.fromarray(rgb), torch.from_numpy(rgb).permute(2, 0, 1), ref, str(folder / "a.png")):
        torch.testing.assert_close(load_image(x), ref)


def test_bad_inputs_name_the_culprit(folder, rgb):
    with pytest.raises(ValueError, match="notes.txt"):
        load_image(str(folder / "notes.txt"))
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        expand_inputs([str(folder / "missing.jpg")])
    with pytest.raises(FileNotFoundError, match=r"\*\.gif"):
        expand_inputs([str(folder / "*.gif")])
    with pytest.raises(ValueError, match="input 0.*HWC uint8"):
        load_image(rgb.astype(np.float32), "input 0")
    with pytest.raises(ValueError, match="CHW"):
        load_image(torch.zeros(4, 8, 8))


def test_expand_inputs_folders_and_globs(folder):
    assert [os.path.basename(p) for p in expand_inputs([str(folder)])] == ["a.png", "b.jpg"]
    assert [os.path.basename(p) for p in expand_inputs([str(folder / "*.jpg")])] == ["b.jpg"]


def test_predict_matches_the_model_and_names_categories(model, rgb, folder):
    with torch.no_grad():
        ref = model([load_image(rgb)])[0]
    res = hrnetdet.predict(model, rgb)
    assert isinstance(res, dict) and len(res["scores"]) == 100
    torch.testing.assert_close(res["boxes"], ref["boxes"])
    assert res["names"] == [model.categories[i] for i in ref["labels"].tolist()]
    assert res["masks"].shape == (100, 1, 72, 108)
    kept = hrnetdet.predict(model, rgb, score_thresh=float(ref["scores"][9]))
    assert len(kept["scores"]) == int((ref["scores"] > ref["scores"][9]).sum()) > 0
    torch.testing.assert_close(kept["boxes"], ref["boxes"][:len(kept["boxes"])])
    assert model.roi_heads.score_thresh == 0.0  # restored after the call
    # a folder gives a list, in file order, batched or not, with file names recorded
    many = hrnetdet.predict(model, str(folder), batch_size=2)
    assert [os.path.basename(r["file_name"]) for r in many] == ["a.png", "b.jpg"]
    assert match_detections(ref, many[0])["matched_frac"] >= MIN_MATCHED  # batching may reorder near-ties


def test_draw_marks_the_detections(model, rgb):
    res = hrnetdet.predict(model, rgb)
    top = {k: (v[:1] if torch.is_tensor(v) else v[:1]) for k, v in res.items()}
    pic = hrnetdet.draw(rgb, top)
    assert pic.dtype == torch.uint8 and pic.shape == (3, 72, 108)
    x0, y0, x1, y1 = top["boxes"][0].int().clamp(min=0).tolist()  # drawn at truncated coordinates
    changed = (pic != torch.from_numpy(rgb).permute(2, 0, 1)).any(0)
    x1, y1 = min(x1, 107), min(y1, 71)
    assert changed[y1, x0:x1 + 1].float().mean() > 0.9  # the box's bottom edge
    assert changed[y0:y1 + 1, x1].float().mean() > 0.9  # and its right edge
    mask = top["masks"][0, 0] > 0
    if mask.any():
        assert changed[mask].all()
    assert torch.equal(hrnetdet.draw(rgb, res, score_thresh=2.0), torch.from_numpy(rgb).permute(2, 0, 1))


def test_predict_command_writes_coco_json_and_pictures(model, folder, tmp_path):
    save_pretrained(model, str(tmp_path / "saved"))
    ckpt = tmp_path / "saved" / "model.safetensors"
    out = tmp_path / "out"
    rc = main(["predict", str(folder), "--model", ARCH, "--checkpoint", str(ckpt), "--score-thr", "0",
               "--out", str(out), "--min-size", "96", "--max-size", "128", "--batch-size", "2"])
    assert rc == 0
    records = json.loads((out / "results.json").read_text())
    assert {os.path.basename(r["file_name"]) for r in records} == {"a.png", "b.jpg"}
    first = [r for r in records if r["image_id"] == 0]
    assert len(first) > 0 and {"bbox", "score", "category_id", "category_name", "segmentation"} <= set(first[0])
    assert all(r["category_id"] in hrnetdet.zoo.coco.COCO_CATEGORY_IDS for r in records)
    assert sorted(p.name for p in out.glob("*.jpg")) == ["a.jpg", "b.jpg"]


def test_predict_command_reports_missing_files(tmp_path):
    with pytest.raises(SystemExit, match="nothing.jpg"):
        main(["predict", str(tmp_path / "nothing.jpg"), "--model", ARCH, "--checkpoint", "unused.safetensors"])
