"""The settings record: checked when made (one line naming the field), kept on the model, written
whole to config.json (and the previous layout still read), changed after the build only through
set_settings / temporary_settings; and the CLI's vocabulary (flags are the Python keywords, earlier
spellings hidden aliases; a run folder names a model)."""
import dataclasses
import json
import logging
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import hrnetdet
from hrnetdet.cli import build_parser, main
from hrnetdet.detectors.settings import (CascadeSettings, FCOSSettings, HTCSettings, RCNNSettings, SettingsError,
                                         set_settings, temporary_settings)
from hrnetdet.inference.thresholds import score_threshold
from hrnetdet.zoo.convert import CheckpointError

ARCH = "faster_rcnn_hrnetv2p_w18"
SMALL = dict(min_size=64, max_size=96, rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20)


@pytest.mark.parametrize("record, values, message", [
    (RCNNSettings, dict(min_size=[0]), "min_size must be a number of pixels from 1 to 10000, got 0"),
    (RCNNSettings, dict(max_size=20000), "max_size must be a number of pixels from 1 to 10000, got 20000"),
    (RCNNSettings, dict(score_thresh=5), "score_thresh must be from 0 to 1, got 5"),
    (RCNNSettings, dict(box_score_thresh=-1), "box_score_thresh must be from 0 to 1, got -1"),
    (CascadeSettings, dict(norm_eval="no"), "norm_eval must be true or false, got 'no'"),
    (FCOSSettings, dict(image_std=[0.2, 0.2, 0]), "image_std must be above 0, got 0"),
    (FCOSSettings, dict(image_mean=[0.5]), "image_mean must be a list of 3 numbers"),
    (HTCSettings, dict(rpn_pre_nms_top_n_test=0), "rpn_pre_nms_top_n_test must be a whole number from 1"),
    (RCNNSettings, dict(detections_per_img=2.5), "detections_per_img must be a whole number"),
    (FCOSSettings, dict(mask_thresh=0.5), "mask_thresh is not a setting of FCOSSettings"),
    (RCNNSettings, dict(min_sise=800), "min_sise is not a setting of RCNNSettings"),
    (RCNNSettings, dict(score_thresh=None), "score_thresh may not be null"),
])
def test_record_refuses_bad_values_naming_the_field(record, values, message):
    with pytest.raises(SettingsError) as error:
        record.from_dict(values)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
    assert error.value.field == next(iter(values))


def test_record_is_frozen_and_normalised():
    settings = RCNNSettings.from_dict({"min_size": 640, "box_score_thresh": 0, "image_mean": [0, 0.5, 1]})
    assert settings.min_size == (640,) and settings.score_thresh == 0.0 and settings.image_mean == (0.0, 0.5, 1.0)
    assert isinstance(settings.score_thresh, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.min_size = (800,)
    assert HTCSettings().score_thresh == 0.001 and CascadeSettings().rpn_post_nms_top_n_train == 2000


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return hrnetdet.create_model(ARCH, num_classes=3, score_thresh=0.2, **SMALL).eval()


def test_model_keeps_its_record_and_config_json_holds_it(model, tmp_path):
    assert model.settings == RCNNSettings(score_thresh=0.2, **SMALL)
    assert model.roi_heads.score_thresh == 0.2 and model.transform.min_size == (64,)
    config = hrnetdet.save_pretrained(model, str(tmp_path))
    on_disk = json.loads((tmp_path / "config.json").read_text())
    assert on_disk["schema_version"] == 2 and on_disk["build_args"] == config["build_args"] == model.settings.to_dict()
    assert hrnetdet.create_model(str(tmp_path)).settings == model.settings


def test_config_json_of_the_previous_layout_loads(model, tmp_path):
    """Before the record, config.json held only the build arguments that differed from the
    defaults, under the builders' names (box_score_thresh...), and no schema_version."""
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    old = {"architecture": ARCH, "family": "faster_rcnn", "width": 18, "num_classes": 3,
           "categories": ["__background__", "class_1", "class_2"], "category_ids": [None, 1, 2],
           "build_args": {"min_size": [64], "max_size": 96, "box_score_thresh": 0.3, "box_detections_per_img": 7,
                          "rpn_post_nms_top_n_test": 20},
           "hrnetdet_version": "0.4.0"}
    (tmp_path / "config.json").write_text(json.dumps(old))
    loaded = hrnetdet.create_model(str(tmp_path))
    assert loaded.settings == RCNNSettings(min_size=(64,), max_size=96, score_thresh=0.3, detections_per_img=7,
                                           rpn_post_nms_top_n_test=20)
    assert loaded.roi_heads.score_thresh == 0.3 and loaded.roi_heads.detections_per_img == 7
    assert torch.equal(loaded.state_dict()["roi_heads.box_predictor.cls_score.weight"],
                       model.state_dict()["roi_heads.box_predictor.cls_score.weight"])
    (tmp_path / "config.json").write_text(json.dumps({**old, "schema_version": 3}))
    with pytest.raises(CheckpointError, match=r"config.json: schema_version must be a whole number from 1 to 2"):
        hrnetdet.create_model(str(tmp_path))


def test_set_settings_changes_the_modules_and_the_record():
    cascade = hrnetdet.create_model("cascade_rcnn_hrnetv2p_w18", **SMALL)
    old = set_settings(cascade, score_thresh=0.4, min_size=(48, 64), rpn_post_nms_top_n_test=10)
    assert old.score_thresh == 0.05 and cascade.settings.score_thresh == 0.4
    assert [s.score_thresh for s in cascade.roi_heads.stages] == [0.4, 0.4, 0.4]
    assert cascade.transform.min_size == (48, 64) and cascade.rpn._post_nms_top_n["testing"] == 10
    with pytest.raises(ValueError, match="frozen_stages shape"):
        set_settings(cascade, frozen_stages=2)
    with pytest.raises(SettingsError, match="score_thresh must be from 0 to 1"):
        set_settings(cascade, score_thresh=2)
    assert cascade.settings.frozen_stages == -1 and cascade.settings.score_thresh == 0.4  # unchanged


def test_temporary_settings_restore_also_on_errors():
    fcos = hrnetdet.create_model("fcos_hrnetv2p_w18", **{k: SMALL[k] for k in ("min_size", "max_size")})
    before = fcos.settings
    with pytest.raises(RuntimeError):
        with temporary_settings(fcos, min_size=(100,), max_size=150.5, score_thresh=0.5) as inside:
            assert inside.score_thresh == 0.5 and fcos.head.score_thresh == 0.5
            assert fcos.transform.min_size == (100,) and fcos.transform.max_size == 150.5
            raise RuntimeError("boom")
    assert fcos.settings == before and fcos.head.score_thresh == 0.05 and fcos.transform.min_size == (64,)
    with score_threshold(fcos, 0.0):  # predict's and export's override goes through the record
        assert fcos.settings.score_thresh == 0.0 and fcos.head.score_thresh == 0.0
    assert fcos.settings == before


def test_flags_are_python_keywords_and_old_spellings_still_parse(tmp_path):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x")
    parser = build_parser()
    common = ["--model", ARCH, "--ann", str(weights), "--images", str(tmp_path)]
    new = parser.parse_args(["eval", *common, "--checkpoint-path", str(weights), "--num-workers", "3"])
    old = parser.parse_args(["eval", *common, "--checkpoint", str(weights), "--workers", "3"])
    assert new.checkpoint_path == old.checkpoint_path == str(weights) and new.num_workers == old.num_workers == 3
    train = parser.parse_args(["train", "--model", ARCH, "--train-ann", str(weights), "--train-images", str(tmp_path),
                               "--out", str(tmp_path / "o"), "--iters", "1", "--workers", "0"])
    assert train.num_workers == 0 and train.checkpoint_path is None
    help_text = new.command_parser.format_help()
    assert "--checkpoint-path" in help_text and "--num-workers" in help_text
    assert "--workers" not in help_text and "--checkpoint " not in help_text


@pytest.fixture(scope="module")
def run_folder(model, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    hrnetdet.save_pretrained(model, str(run / "best"))
    image = run / "a.png"
    Image.new("RGB", (80, 60), (120, 40, 200)).save(image)
    return run, image


@pytest.mark.parametrize("which", ["best", "run"])
def test_predict_takes_a_run_folder_as_its_model(run_folder, which, tmp_path, capsys):
    run, image = run_folder
    name = str(run / "best") if which == "best" else str(run)
    assert main(["predict", str(image), "--model", name, "--out", str(tmp_path / "out"), "--no-draw"]) == 0
    assert (tmp_path / "out" / "results.json").is_file()
    said = [line for line in capsys.readouterr().err.splitlines() if "training run" in line]
    assert said == ([f"hrnetdet predict: {run} is a training run: using {run / 'best'}"] if which == "run" else [])


def test_create_model_takes_a_run_folder_and_says_so(run_folder, model, caplog):
    run, _ = run_folder
    with caplog.at_level(logging.INFO, logger="hrnetdet"):
        assert hrnetdet.create_model(str(run)).settings == model.settings
    assert f"{run} is a training run: using its best/" in caplog.text


def test_a_folder_without_a_saved_model_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="without config.json"):
        hrnetdet.create_model(str(tmp_path))


def test_models_command_does_not_import_torch():
    code = ("import sys; from hrnetdet.cli import main; main(['models', '*w18*']); "
            "print('torch' in sys.modules, file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "faster_rcnn_hrnetv2p_w18" in proc.stdout and "coco_2x" in proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == "False"


def test_train_min_sizes_reach_the_record_in_one_step(tmp_path, monkeypatch):
    """``--min-size 48 64`` is the record's min_size (multi-scale training, test size 64), given to
    create_model: no size is written into the model afterwards."""
    from hrnetdet.engine import commands
    built, fitted = {}, {}
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}))

    def create_model(name, *args, **kwargs):
        built.update(kwargs)
        return hrnetdet.create_model(name, num_classes=2, **{k: kwargs[k] for k in ("min_size", "max_size")})

    monkeypatch.setattr(commands, "create_model", create_model)
    monkeypatch.setattr(commands, "fit", lambda model, *args, **kwargs: fitted.update(kwargs, model=model) or {})
    assert main(["train", "--model", ARCH, "--train-ann", str(ann), "--train-images", str(tmp_path),
                 "--out", str(tmp_path / "o"), "--iters", "1", "--min-size", "48", "64", "--max-size", "80"]) == 0
    assert built["min_size"] == [48, 64] and built["max_size"] == 80 and "multiscale" not in fitted
    model = fitted["model"]
    assert model.settings.min_size == (48, 64) and model.transform.min_size == (48, 64)
