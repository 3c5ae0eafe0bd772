"""Models rebuild exactly from what they save (save_pretrained / create_model(DIR), a config.json
beside a checkpoint), and a training run goes to the Hub (`hrnetdet push`) and back
(`create_model("hf-hub:org/name")`), against the loopback Hub of tests/fake_hub.py."""
import copy
import dataclasses
import json
import os
import shutil
import stat

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import hrnetdet
from fake_hub import env, hub  # noqa: F401  (fixtures)
from hrnetdet.cli import main as cli_main
from hrnetdet.zoo.config import validate_config
from hrnetdet.zoo.registry import list_families

ARCH = "faster_rcnn_hrnetv2p_w18"
TRAINED = dict(min_size=96, max_size=120, box_score_thresh=0.2, rpn_post_nms_top_n_test=50, box_detections_per_img=7)
CATEGORIES = ["cat", "dog", "fox"]
DATASET_IDS = [3, 17, 42]


def _other(value):
    """A value of the same kind that is not ``value``."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return round(value / 2 + 0.01, 4)
    if isinstance(value, str):
        return {"mean": "last", "v2": "v3"}[value]
    if all(isinstance(v, int) for v in value):
        return [value[0] // 8, value[0] // 4]
    return [round(v + 0.1, 3) for v in value]


# What each setting is in the modules (the test's own reading: the library never reads them back).
MODULE_VALUES = {
    "norm_eval": lambda m: m.backbone.body.norm_eval,
    "frozen_stages": lambda m: m.backbone.body.frozen_stages,
    "min_size": lambda m: tuple(m.transform.min_size),
    "max_size": lambda m: m.transform.max_size,
    "image_mean": lambda m: tuple(m.transform.image_mean),
    "image_std": lambda m: tuple(m.transform.image_std),
    "mask_thresh": lambda m: m.transform.mask_thresh,
    "rpn_pre_nms_top_n_train": lambda m: m.rpn._pre_nms_top_n["training"],
    "rpn_pre_nms_top_n_test": lambda m: m.rpn._pre_nms_top_n["testing"],
    "rpn_post_nms_top_n_train": lambda m: m.rpn._post_nms_top_n["training"],
    "rpn_post_nms_top_n_test": lambda m: m.rpn._post_nms_top_n["testing"],
    "rpn_nms_thresh": lambda m: m.rpn.nms_thresh,
    "rpn_batch_size_per_image": lambda m: m.rpn.fg_bg_sampler.batch_size_per_image,
    "score_thresh": lambda m: {h.score_thresh for h in _heads(m)},
    "nms_thresh": lambda m: {h.nms_thresh for h in _heads(m)},
    "detections_per_img": lambda m: {h.detections_per_img for h in _heads(m)},
    "box_batch_size_per_image": lambda m: {h.fg_bg_sampler.batch_size_per_image for h in _heads(m)},
    "mask_ensemble": lambda m: m.roi_heads.mask_ensemble,
    "semantic": lambda m: m.roi_heads.semantic_head is not None,
    "semantic_num_classes": lambda m: m.roi_heads.semantic_head.conv_logits.out_channels,
    "topk_candidates": lambda m: m.head.topk_candidates,
    "postprocess": lambda m: m.head.postprocess,
}


def _heads(model):
    heads = getattr(model, "roi_heads", None)
    return [model.head] if heads is None else list(getattr(heads, "stages", [heads]))


def _module_values(model):
    return {f.name: MODULE_VALUES[f.name](model) for f in dataclasses.fields(model.settings)}


def test_every_setting_reaches_the_modules_and_config_json():
    """Every field of each family's record (changed from its default) reaches the modules at the
    build, is written to config.json and rebuilds the same record and modules; those that may change
    after the build reach the same module values through set_settings."""
    for family in list_families():
        arch = f"{family.name}_hrnetv2p_w18"
        defaults = family.make_settings()
        changed = {k: _other(v) for k, v in defaults.to_dict().items() if v is not None and k != "semantic"}
        with torch.device("meta"):
            model = family.build(18, **changed)
            assert {k: model.settings.to_dict()[k] for k in changed} == changed, family.name
            config = json.loads(json.dumps({"schema_version": 2, "build_args": model.settings.to_dict()}))
            record = validate_config(config, "config.json", arch)
            assert record == model.settings, family.name
            again = family.build(18, settings=record)
            assert _module_values(again) == _module_values(model), family.name
            later = family.build(18, **{k: v for k, v in changed.items()
                                        if k in ("frozen_stages", "semantic", "semantic_num_classes")})
            later.arch = arch
            hrnetdet.set_settings(later, **changed)
            assert later.settings == model.settings and _module_values(later) == _module_values(model), family.name
    with torch.device("meta"):
        htc = hrnetdet.create_model("htc_hrnetv2p_w18", semantic=False)
    assert htc.settings.semantic is False and htc.roi_heads.semantic_head is None


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-class W18 Faster R-CNN with non-default settings, multi-scale sizes set after it was built
    (as training does), dataset category ids, saved with save_pretrained."""
    torch.manual_seed(0)
    model = hrnetdet.create_model(ARCH, num_classes=4, categories=CATEGORIES, category_ids=DATASET_IDS, **TRAINED)
    torch.nn.init.normal_(model.roi_heads.box_predictor.cls_score.weight, std=0.5)
    hrnetdet.set_settings(model, min_size=(80, 96))  # as multi-scale training does
    directory = tmp_path_factory.mktemp("run") / "best"
    hrnetdet.save_pretrained(model, str(directory), {"trained_on": "train.json", "iteration": 10,
                                                     "val_metrics": {"bbox_AP": 0.25, "bbox_AP50": 0.5}})
    return model.eval(), directory


def _same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.settings == b.settings
    assert a.categories == b.categories and a.category_ids == b.category_ids
    image = torch.rand(3, 90, 110)
    with torch.no_grad():
        da, db = a.eval()([image])[0], b.eval()([image])[0]
    assert len(da["boxes"]) > 0 and all(torch.equal(da[k], db[k]) for k in da)


def test_save_pretrained_config_and_rebuild(trained):
    model, directory = trained
    config = json.loads((directory / "config.json").read_text())
    assert config["architecture"] == ARCH and config["num_classes"] == 4
    assert config["categories"] == ["__background__", *CATEGORIES]
    assert config["category_ids"] == [None, *DATASET_IDS]
    assert config["schema_version"] == 2 and config["build_args"] == model.settings.to_dict()
    assert {k: config["build_args"][k] for k in ("min_size", "max_size", "score_thresh", "rpn_post_nms_top_n_test",
                                                 "detections_per_img", "rpn_pre_nms_top_n_test")} == {
        "min_size": [80, 96], "max_size": 120, "score_thresh": 0.2, "rpn_post_nms_top_n_test": 50,
        "detections_per_img": 7, "rpn_pre_nms_top_n_test": 1000}
    assert config["trained_on"] == "train.json" and config["hrnetdet_version"] == hrnetdet.__version__
    again = hrnetdet.create_model(str(directory))
    _same_model(model, again)
    assert list(again.transform.min_size) == [80, 96] and again.transform.max_size == 120
    assert again.category_ids[1:] == DATASET_IDS
    # the way predict and eval load it: the architecture and the file, with the config.json beside it
    by_file = hrnetdet.create_model(ARCH, checkpoint_path=str(directory / "model.safetensors"))
    _same_model(model, by_file)
    # keywords still override the saved settings
    assert hrnetdet.create_model(str(directory), min_size=64).transform.min_size == (64,)


def test_files_get_the_users_umask(trained, tmp_path):
    model, _ = trained
    old = os.umask(0o002)
    try:
        hrnetdet.save_pretrained(model, str(tmp_path / "shared"))
    finally:
        os.umask(old)
    for name in ("model.safetensors", "config.json"):
        assert stat.S_IMODE(os.stat(tmp_path / "shared" / name).st_mode) == 0o664, name
    hrnetdet.save_pretrained(model, str(tmp_path / "default"))
    assert stat.S_IMODE(os.stat(tmp_path / "default" / "model.safetensors").st_mode) == 0o666 & ~old


def test_checkpoint_without_config_loads_with_the_defaults(trained, tmp_path):
    model, _ = trained
    plain = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(plain))
    loaded = hrnetdet.create_model(ARCH, checkpoint_path=str(plain), num_classes=4)
    assert loaded.transform.min_size == (800,) and loaded.roi_heads.score_thresh == 0.05
    assert loaded.categories == ["__background__", "class_1", "class_2", "class_3"]
    assert loaded.category_ids == [None, 1, 2, 3]
    assert torch.equal(loaded.state_dict()["roi_heads.box_predictor.cls_score.weight"],
                       model.state_dict()["roi_heads.box_predictor.cls_score.weight"])
    coco = hrnetdet.create_model(ARCH)
    assert coco.category_ids[:4] == [None, 1, 2, 3] and coco.category_ids[-1] == 90  # COCO's own ids


def _run_dir(trained, tmp_path):
    """A training run folder: best/ plus curves and per-class AP from `hrnetdet eval --out`."""
    model, best = trained
    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(best, run / "best")
    Image.new("RGB", (40, 30), (200, 30, 30)).save(run / "loss.png")
    per_class = {"bbox": {"stats": {"AP": 0.25}, "per_class": {"cat": 0.5, "dog": 0.125, "fox": 0.0}}}
    (run / "metrics.json").write_text(json.dumps(per_class))
    return run


def test_push_then_load_by_hub_name(trained, hub, tmp_path, monkeypatch, capsys):
    model, _ = trained
    run = _run_dir(trained, tmp_path)
    assert cli_main(["push", str(run), "--repo", "me/pets-detector"]) == 0
    assert 'create_model("hf-hub:me/pets-detector", pretrained=True)' in capsys.readouterr().out
    first = hub.refs[("me/pets-detector", "main")]
    uploaded = {name for (repo, commit, name) in hub.files if repo == "me/pets-detector" and commit == first}
    assert uploaded == {"model.safetensors", "config.json", "README.md", "loss.png"}
    card = hub.files[("me/pets-detector", first, "README.md")].decode()
    front = card.split("---")[1]
    for line in ("library_name: hrnetdet", "pipeline_tag: object-detection", "value: 0.25"):
        assert line in front, line
    assert 'hrnetdet.create_model("hf-hub:me/pets-detector", pretrained=True)' in card
    assert "| 17 | dog | 0.125 |" in card and "![loss](loss.png)" in card and "`min_size=[80, 96]`" in card
    _same_model(model, hrnetdet.create_model("hf-hub:me/pets-detector", pretrained=True))
    without_weights = hrnetdet.create_model("hf-hub:me/pets-detector")
    assert without_weights.settings == model.settings and without_weights.categories == model.categories

    # a second push moves main on; @revision pins the first
    retrained = copy.deepcopy(model)
    with torch.no_grad():
        retrained.roi_heads.box_predictor.cls_score.bias += 1
    hrnetdet.save_pretrained(retrained, str(run / "best"))
    assert cli_main(["push", str(run), "--repo", "me/pets-detector"]) == 0
    bias = "roi_heads.box_predictor.cls_score.bias"
    latest = hrnetdet.create_model("hf-hub:me/pets-detector", pretrained=True)
    pinned = hrnetdet.create_model(f"hf-hub:me/pets-detector@{first}", pretrained=True)
    assert torch.equal(latest.state_dict()[bias], retrained.state_dict()[bias])
    assert torch.equal(pinned.state_dict()[bias], model.state_dict()[bias])

    # offline, from the cache, without a request
    hub.requests.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = hrnetdet.create_model(f"hf-hub:me/pets-detector@{first}", pretrained=True)
    assert torch.equal(offline.state_dict()[bias], pinned.state_dict()[bias]) and hub.requests == []
    with pytest.raises(FileNotFoundError, match="not in the Hub cache"):
        hrnetdet.create_model("hf-hub:me/never-pushed", pretrained=True)


def test_push_needs_a_run_folder(tmp_path):
    with pytest.raises(SystemExit, match="no best/ or last/"):  # the CLI's one-line error
        cli_main(["push", str(tmp_path), "--repo", "me/x"])
