"""Getting weights, against a loopback server that answers as the Hugging Face Hub (for
hf_hub_download) and as the reference's download site do (tests/fake_hub.py). No network."""
import dataclasses
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, save

import hrnetdet
from fake_hub import env, hub, serve_reference  # noqa: F401  (fixtures)
from hrnetdet.backbone import HRNet
from hrnetdet.cli import main as cli_main
from hrnetdet.zoo import registry
from hrnetdet.data.categories import COCO_CATEGORY_NAMES
from hrnetdet.zoo.convert import CheckpointError
from hrnetdet.zoo.hub import (_reference_file, backbone_weights_file, class_dependent_keys, converted_path, fetch_pretrained,
                              load_except_class_layers, load_pretrained_checkpoint)
from model_zoo import MODEL_ZOO, model_zoo_markdown
from model_zoo import main as model_zoo_main
from reference_layout import reference_checkpoint

ARCH = "faster_rcnn_hrnetv2p_w18"
REF_ARCH = "faster_rcnn_hrnetv2p_w32"  # the key listing's width
COMMIT_A = "a" * 40
COMMIT_B = "b" * 40
REPO = "hrnetdet-test/faster_rcnn_hrnetv2p_w18"
TIMM_REPO = "timm/hrnet_w18.ms_in1k"


def _tiny_weights(value: float) -> bytes:
    meta = {"hrnetdet": json.dumps({"family": "faster_rcnn", "width": 18, "num_classes": 81})}
    return save({"w": torch.full((4, 4), value)}, metadata=meta)


def _hub_cfg(hub, sha256=None, tag="coco_1x"):
    """A registry record published on the fake Hub at COMMIT_A; main has moved on to COMMIT_B."""
    good, newer = _tiny_weights(1.0), _tiny_weights(2.0)
    hub.files[(REPO, COMMIT_A, "model.safetensors")] = good
    hub.files[(REPO, COMMIT_B, "model.safetensors")] = newer
    hub.refs[(REPO, "main")] = COMMIT_B
    return dataclasses.replace(hrnetdet.get_pretrained_cfg(f"{ARCH}.{tag}"), hf_hub_id=REPO,
                               hf_revision=COMMIT_A, sha256=sha256 or hashlib.sha256(good).hexdigest())


RESOLVE_A = f"/{REPO}/resolve/{COMMIT_A}/model.safetensors"


def test_hub_download_is_pinned_tagged_and_cached(hub, env):
    ckpt = load_pretrained_checkpoint(_hub_cfg(hub))
    assert torch.equal(ckpt.state_dict["w"], torch.full((4, 4), 1.0))  # COMMIT_A's file, not main's
    assert {p for _, p, _ in hub.requests} == {RESOLVE_A}
    assert all("hrnetdet/" in ua for _, _, ua in hub.requests)  # library_name/version for the Hub's stats
    assert (env / "hf" / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT_A / "model.safetensors").exists()
    hub.requests.clear()
    load_pretrained_checkpoint(_hub_cfg(hub))
    assert hub.requests == []  # a pinned commit in the cache: not even a HEAD


def test_hub_revision_must_be_a_full_commit(hub):
    with pytest.raises(ValueError, match="full 40-hex commit"):
        fetch_pretrained(dataclasses.replace(_hub_cfg(hub), hf_revision="main"))


def test_hub_corrupted_download_is_deleted_and_fetched_again(hub):
    hub.corrupt[RESOLVE_A] = 1
    ckpt = load_pretrained_checkpoint(_hub_cfg(hub))
    assert torch.equal(ckpt.state_dict["w"], torch.full((4, 4), 1.0))
    assert len(hub.gets(RESOLVE_A)) == 2


def test_hub_checksum_mismatch_fails_after_one_retry(hub, env):
    cfg = _hub_cfg(hub, sha256="0" * 64)
    with pytest.raises(CheckpointError) as e:
        fetch_pretrained(cfg)
    actual = hashlib.sha256(_tiny_weights(1.0)).hexdigest()
    assert "0" * 64 in str(e.value) and actual in str(e.value) and "model.safetensors" in str(e.value)
    assert len(hub.gets(RESOLVE_A)) == 2
    assert not list((env / "hf").rglob(actual))  # the bad blob is gone


def test_offline_missing_file_says_what_to_put_where(hub, env, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as e:
        fetch_pretrained(_hub_cfg(hub))
    msg = str(e.value)
    assert str(env / "hf" / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT_A / "model.safetensors") in msg
    assert "hrnetdet download" in msg
    cfg = hrnetdet.get_pretrained_cfg(f"{ARCH}.coco_2x")
    with pytest.raises(FileNotFoundError) as e:
        fetch_pretrained(cfg, local_files_only=True)
    msg = str(e.value)
    assert converted_path(cfg) in msg and str(env / "home" / "reference" / cfg.reference_file) in msg
    assert cfg.reference_url.rsplit("/", 1)[1] in msg
    assert hub.requests == []


# ---- the reference's own checkpoints: download, check, convert, cache -------------------------

@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A W32 Faster R-CNN checkpoint in the reference's layout (keys from the key listing, random
    values): (its direct conversion's state dict, .pth bytes, .pth path)."""
    path = tmp_path_factory.mktemp("reference") / "faster_rcnn_w32.pth"
    ckpt = reference_checkpoint("faster_rcnn")
    ckpt["meta"]["CLASSES"] = COCO_CATEGORY_NAMES
    torch.save(ckpt, path)
    sd = hrnetdet.create_model(REF_ARCH, checkpoint_path=str(path)).state_dict()
    return sd, path.read_bytes(), str(path)


def _assert_state(model, sd):
    own = model.state_dict()
    assert own.keys() == sd.keys()
    assert all(torch.equal(own[k], sd[k]) for k in sd)


def test_reference_fallback_downloads_converts_once_then_works_offline(hub, monkeypatch, reference, tmp_path,
                                                                        capsys):
    """`hrnetdet download` of a record without Hub weights (the reference's .pth is fetched, checked,
    converted, cached) and of a Hub record; then the folder's copy serves both offline."""
    sd, data, _ = reference
    cfg, path = serve_reference(hub, monkeypatch, data, f"{REF_ARCH}.coco_1x")
    hub_cfg = _hub_cfg(hub, tag="coco_2x")
    monkeypatch.setitem(registry._pretrained, ARCH, [hub_cfg])
    dl = tmp_path / "dl"
    assert cli_main(["download", cfg.name, hub_cfg.name, "--dir", str(dl)]) == 0
    assert "HF_HUB_OFFLINE=1" in capsys.readouterr().out
    assert hub.gets() == [path, RESOLVE_A]
    assert Path(converted_path(cfg, str(dl))).exists() and not list(dl.joinpath("reference").glob("*.pth"))
    hub.requests.clear()
    for record in (cfg, hub_cfg):  # online, a second time: nothing is requested
        fetch_pretrained(record, home=str(dl), cache_dir=str(dl / "hub"))
    assert hub.requests == []
    copy = tmp_path / "copied"
    shutil.copytree(dl, copy, symlinks=True)
    shutil.rmtree(dl)
    hub.requests.clear()
    for var in ("HF_HUB_CACHE", "HF_ENDPOINT", "HRNETDET_REFERENCE_URL"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("HRNETDET_HOME", str(copy))
    monkeypatch.setenv("HF_HOME", str(copy))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # the converted weights, with no ImageNet backbone fetched next to the detector's
    model = hrnetdet.create_model(cfg.name, pretrained=True, weights_backbone=True)
    _assert_state(model, sd)
    assert model.categories[1:] == list(COCO_CATEGORY_NAMES)
    assert torch.equal(load_pretrained_checkpoint(hub_cfg).state_dict["w"], torch.full((4, 4), 1.0))
    assert hub.requests == []
    # a damaged cached file is caught by the sha256 beside it and not used (nor deleted: another
    # process may be reading it); offline, the error says what to fetch
    cached = Path(converted_path(cfg))
    with open(cached, "r+b") as f:
        f.seek(1000)
        f.write(b"\0" * 8)
    with pytest.raises(FileNotFoundError, match=re.escape(cfg.reference_file)):
        fetch_pretrained(cfg)
    assert hub.requests == []


def test_reference_corrupted_download_is_fetched_again_once(hub, monkeypatch, env):
    data = b"not a checkpoint, only its sha256 prefix matters here"
    cfg, path = serve_reference(hub, monkeypatch, data, f"{REF_ARCH}.coco_1x")
    home = str(env / "home")
    hub.corrupt[path] = 1
    pth = _reference_file(cfg, home, offline=False)
    assert hub.gets() == [path, path]
    assert hashlib.sha256(Path(pth).read_bytes()).hexdigest().startswith(cfg.reference_sha256_prefix)
    os.remove(pth)
    hub.requests.clear()
    hub.corrupt[path] = 2
    with pytest.raises(CheckpointError) as e:
        _reference_file(cfg, home, offline=False)
    msg = str(e.value)
    assert cfg.reference_file in msg and cfg.reference_sha256_prefix in msg
    assert hashlib.sha256(bytes([data[0] ^ 0xFF]) + data[1:]).hexdigest() in msg
    assert hub.gets() == [path, path]
    assert not os.path.exists(pth)


def test_num_classes_loads_all_but_class_layers(reference, caplog):
    sd, _, pth = reference
    with caplog.at_level("INFO", logger="hrnetdet"):
        model = hrnetdet.create_model(REF_ARCH, checkpoint_path=pth, num_classes=4)
    own = model.state_dict()
    skipped = class_dependent_keys(REF_ARCH)
    assert skipped == {f"roi_heads.box_predictor.{m}.{p}" for m in ("cls_score", "bbox_pred") for p in ("weight", "bias")}
    assert own["roi_heads.box_predictor.cls_score.weight"].shape == (4, 1024)
    assert all(torch.equal(own[k], sd[k]) for k in sd if k not in skipped)
    assert "roi_heads.box_predictor.cls_score.weight" in caplog.text


def test_class_dependent_layers_of_every_family():
    """For every family (on the meta device, so it stays cheap): the class-dependent keys are exactly
    those whose shapes differ between a COCO and a 3-class model, and a COCO state dict loads into a
    3-class model with every other key fitting exactly. Values are checked in the test above."""
    for family in hrnetdet.list_families():
        arch = registry.arch_name(family.name, min(family.widths))
        with torch.device("meta"):
            coco, small = (family.build(min(family.widths), num_classes=n) for n in (81, 3))
        a, b = coco.state_dict(), small.state_dict()
        skipped = class_dependent_keys(arch)
        assert skipped and skipped == {k for k in a if a[k].shape != b[k].shape}, family.name
        load_except_class_layers(small, a, "coco", arch)
        with pytest.raises(CheckpointError, match="mismatched shapes"):
            load_except_class_layers(small, {**a, "backbone.body.conv1.weight": a["backbone.body.conv1.weight"][:1]},
                                     "coco", arch)


def test_weights_backbone_loads_timm_imagenet_hrnet(hub, tmp_path, monkeypatch):
    torch.manual_seed(1)
    body = HRNet(18).state_dict()
    imagenet = {**{k: torch.randn_like(v.float()).to(v.dtype) for k, v in body.items()},
                "classifier.weight": torch.zeros(1000, 2048)}
    hub.files[(TIMM_REPO, COMMIT_A, "model.safetensors")] = save(imagenet)
    hub.refs[(TIMM_REPO, "main")] = COMMIT_A
    model = hrnetdet.create_model(ARCH, weights_backbone=True)
    got = model.backbone.body.state_dict()
    assert all(torch.equal(got[k], imagenet[k]) for k in body)
    assert hub.gets() == [f"/{TIMM_REPO}/resolve/main/model.safetensors"]
    with pytest.raises(ValueError, match="not a timm HRNet"):
        backbone_weights_file("resnet_nonexistent", 18)
    # for an offline machine: `hrnetdet download --backbone`, then the folder serves it offline
    assert cli_main(["download", "--backbone", "hrnet_w18.ms_in1k", "--dir", str(tmp_path / "dl")]) == 0
    hub.requests.clear()
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "dl"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = backbone_weights_file(True, 18)
    assert path.startswith(str(tmp_path / "dl" / "hub")) and load(Path(path).read_bytes()).keys() == imagenet.keys()
    assert hub.requests == []


def test_record_push_uploads_converted_weights_and_model_card(hub, reference, capsys):
    """The maintainer's publishing of a registry record (tools/model_zoo.py push), to the loopback Hub."""
    sd, _, pth = reference
    assert model_zoo_main(["push", f"{REF_ARCH}.coco_1x", "--repo-id", "me/frcnn", "--checkpoint", pth]) == 0
    commit = hub.refs[("me/frcnn", "main")]
    uploads = {name: data for (repo, c, name), data in hub.files.items() if repo == "me/frcnn" and c == commit}
    assert set(uploads) == {"model.safetensors", "config.json", "README.md"} and "me/frcnn" in hub.repos
    weights = load(uploads["model.safetensors"])
    assert weights.keys() == sd.keys() and all(torch.equal(weights[k], sd[k]) for k in sd)
    out = capsys.readouterr().out
    assert f"hf_revision='{commit}'" in out and hashlib.sha256(uploads["model.safetensors"]).hexdigest() in out
    card = uploads["README.md"].decode()
    front = card.split("---")[1]
    for line in ("library_name: hrnetdet", "pipeline_tag: object-detection", "- coco", "license: apache-2.0",
                 "model-index:", "value: 40.2"):
        assert line in front, line
    assert 'create_model("faster_rcnn_hrnetv2p_w32.coco_1x", pretrained=True)' in card
    assert 'create_model("hf-hub:me/frcnn", pretrained=True)' in card
    assert "toothbrush" in card and "pending" in card
    assert json.loads(uploads["config.json"])["architecture"] == REF_ARCH


def test_model_zoo_md_is_up_to_date(tmp_path):
    assert MODEL_ZOO.read_text() == model_zoo_markdown(), \
        "MODEL_ZOO.md is out of date: run `python tools/model_zoo.py`"
    stale = tmp_path / "MODEL_ZOO.md"
    stale.write_text(MODEL_ZOO.read_text().replace("36.9", "36.8"))
    assert model_zoo_main(["--check", "--out", str(stale)]) == 1
    assert model_zoo_main(["--out", str(stale)]) == 0 and stale.read_text() == model_zoo_markdown()
    text = MODEL_ZOO.read_text()
    from hrnetdet.zoo.models import PUBLISHED
    for arch, tag, file, *_ in PUBLISHED:  # every reference row, with its own checkpoint
        assert f"`{arch}.{tag}`" in text and re.search(r"-([0-9a-f]{8})\.pth$", file).group(1) in text
