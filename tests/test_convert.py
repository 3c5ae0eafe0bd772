"""Reference checkpoints convert and load (also those an mmengine trainer wrote, with no code run);
hrnetdet's safetensors round-trip; bad files get clear errors."""
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import hrnetdet
from hrnetdet.cli import main as cli
from hrnetdet.zoo.checkpoint import read_checkpoint
from hrnetdet.zoo.convert import CheckpointError
from reference_layout import mmengine_classes, reference_checkpoint


@pytest.fixture(scope="module")
def ref_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    paths = {}
    for family in ("faster_rcnn", "mask_rcnn"):
        paths[family] = str(d / f"{family}_w32.pth")
        torch.save(reference_checkpoint(family), paths[family])
    return paths


@pytest.fixture(scope="module")
def mask_w32(ref_files):
    return hrnetdet.create_model("mask_rcnn_hrnetv2p_w32", checkpoint_path=ref_files["mask_rcnn"])


def test_faster_reference_layout_converts(ref_files):
    sd = reference_checkpoint("faster_rcnn")["state_dict"]
    model = hrnetdet.create_model("faster_rcnn_hrnetv2p_w32", checkpoint_path=ref_files["faster_rcnn"])
    ours = model.state_dict()
    assert len(ours) == len(sd)
    cls_w = ours["roi_heads.box_predictor.cls_score.weight"]
    torch.testing.assert_close(cls_w[0], sd["roi_head.bbox_head.fc_cls.weight"][80])
    torch.testing.assert_close(cls_w[1:], sd["roi_head.bbox_head.fc_cls.weight"][:80])
    torch.testing.assert_close(ours["roi_heads.box_predictor.cls_score.bias"][0], sd["roi_head.bbox_head.fc_cls.bias"][80])
    reg_w = ours["roi_heads.box_predictor.bbox_pred.weight"]
    assert reg_w.shape == (324, 1024) and reg_w[:4].abs().sum() == 0
    torch.testing.assert_close(reg_w[4:], sd["roi_head.bbox_head.fc_reg.weight"])
    torch.testing.assert_close(ours["backbone.body.stage4.2.fuse_layers.0.3.0.weight"],
                               sd["backbone.stage4.2.fuse_layers.0.3.0.weight"])
    torch.testing.assert_close(ours["backbone.fpn.fpn_convs.4.bias"], sd["neck.fpn_convs.4.conv.bias"])
    torch.testing.assert_close(ours["rpn.head.conv.0.0.weight"], sd["rpn_head.rpn_conv.weight"])
    torch.testing.assert_close(ours["roi_heads.box_head.fc6.weight"], sd["roi_head.bbox_head.shared_fcs.0.weight"])
    assert model.categories[1] == "person" and len(model.categories) == 81


def test_mask_reference_layout_converts(mask_w32):
    sd = reference_checkpoint("mask_rcnn")["state_dict"]
    ours = mask_w32.state_dict()
    logits = ours["roi_heads.mask_predictor.mask_fcn_logits.weight"]
    assert logits.shape == (81, 256, 1, 1) and logits[0].abs().sum() == 0
    torch.testing.assert_close(logits[1:], sd["roi_head.mask_head.conv_logits.weight"])
    torch.testing.assert_close(ours["roi_heads.mask_head.3.0.weight"], sd["roi_head.mask_head.convs.3.conv.weight"])
    torch.testing.assert_close(ours["roi_heads.mask_predictor.conv5_mask.weight"], sd["roi_head.mask_head.upsample.weight"])


def test_convert_command_round_trip(ref_files, mask_w32, tmp_path):
    out = tmp_path / "converted"
    assert cli(["convert", ref_files["mask_rcnn"], "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "mask_rcnn_hrnetv2p_w32" and config["num_classes"] == 81
    again = hrnetdet.create_model("mask_rcnn_hrnetv2p_w32", checkpoint_path=str(out / "model.safetensors"))
    for k, v in mask_w32.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    image = [torch.rand(3, 64, 96)]
    mask_w32.eval(), again.eval()
    for m in (mask_w32, again):
        m.transform.min_size, m.transform.max_size = (64,), 96
    with torch.no_grad():
        a, b = mask_w32(image)[0], again(image)[0]
    for k in a:
        assert torch.equal(a[k], b[k])


def test_wrong_family_is_named(ref_files):
    with pytest.raises(CheckpointError, match="holds a mask_rcnn_hrnetv2p_w32 checkpoint, not faster_rcnn_hrnetv2p_w32"):
        hrnetdet.create_model("faster_rcnn_hrnetv2p_w32", checkpoint_path=ref_files["mask_rcnn"])


def test_wrong_width_is_named(ref_files):
    with pytest.raises(CheckpointError, match="faster_rcnn_hrnetv2p_w32 checkpoint, not faster_rcnn_hrnetv2p_w18"):
        hrnetdet.create_model("faster_rcnn_hrnetv2p_w18", checkpoint_path=ref_files["faster_rcnn"])


def test_missing_and_unknown_keys_are_named(tmp_path):
    ckpt = reference_checkpoint("faster_rcnn")
    del ckpt["state_dict"]["backbone.stage4.2.branches.3.3.conv2.weight"]
    path = tmp_path / "missing.pth"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=r"1 missing keys, e.g. \['backbone.body.stage4.2.branches.3.3.conv2.weight'\]"):
        hrnetdet.create_model("faster_rcnn_hrnetv2p_w32", checkpoint_path=str(path))
    ckpt = reference_checkpoint("faster_rcnn")
    ckpt["state_dict"]["roi_head.extra_head.weight"] = torch.zeros(3)
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="keys of no faster_rcnn layout: \\['roi_head.extra_head.weight'\\]"):
        hrnetdet.create_model("faster_rcnn_hrnetv2p_w32", checkpoint_path=str(path))


def test_mismatched_shapes_are_named(tmp_path):
    path = tmp_path / "w18_state_dict.pth"
    torch.save(hrnetdet.create_model("faster_rcnn_hrnetv2p_w18").state_dict(), path)
    with pytest.raises(CheckpointError, match=r"does not fit faster_rcnn_hrnetv2p_w32: \d+ mismatched shapes, e.g. \['backbone.body"):
        hrnetdet.create_model("faster_rcnn_hrnetv2p_w32", checkpoint_path=str(path))


def test_truncated_and_foreign_files(ref_files, tmp_path):
    data = open(ref_files["faster_rcnn"], "rb").read()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.pth: truncated or corrupted PyTorch checkpoint") as e:
        hrnetdet.create_model("faster_rcnn_hrnetv2p_w32", checkpoint_path=str(truncated))
    assert "weights_only" not in str(e.value)
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match="notes.txt: not a checkpoint at all"):
        hrnetdet.create_model("faster_rcnn_hrnetv2p_w32", checkpoint_path=str(text))
    other = tmp_path / "other.pth"
    torch.save({"state_dict": {"encoder.weight": torch.zeros(2)}}, other)
    with pytest.raises(CheckpointError, match="not an HRNetV2p detector checkpoint"):
        hrnetdet.create_model("faster_rcnn_hrnetv2p_w32", checkpoint_path=str(other))
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        hrnetdet.create_model("faster_rcnn_hrnetv2p_w32", checkpoint_path=str(tmp_path / "nowhere.pth"))


MARKER = "ran.txt"


class _Malicious:
    """Pickles as a call of os.system, which unpickling would run."""

    def __init__(self, folder):
        self.folder = folder

    def __reduce__(self):
        return os.system, (f"touch {os.path.join(self.folder, MARKER)}",)


def test_mmengine_era_checkpoint_loads_and_runs_no_code(tmp_path):
    """An mmengine trainer's checkpoint: numpy scalars and arrays, a ConfigDict and a HistoryBuffer
    beside the weights (and a call of os.system in its meta) still yields its state dict, with the
    classes its dataset_meta names; the os.system call never runs."""
    ckpt = reference_checkpoint("faster_rcnn")
    path = tmp_path / "epoch_12.pth"
    with mmengine_classes() as (HistoryBuffer, ConfigDict):
        ckpt["meta"] = {"epoch": np.int64(12), "lr": np.float64(0.02), "seed": np.array([1, 2, 3]),
                        "cfg": ConfigDict(model=ConfigDict(type="FasterRCNN")), "hook": _Malicious(str(tmp_path)),
                        "dataset_meta": {"classes": tuple(f"thing{i}" for i in range(80))}}
        ckpt["message_hub"] = {"log_scalars": {"train/loss": HistoryBuffer()},
                               "runtime_info": {"iter": np.int64(90000)}}
        torch.save(ckpt, path)
    model = hrnetdet.create_model("faster_rcnn_hrnetv2p_w32", checkpoint_path=str(path))
    torch.testing.assert_close(model.state_dict()["rpn.head.conv.0.0.weight"], ckpt["state_dict"]["rpn_head.rpn_conv.weight"])
    assert model.categories[1] == "thing0" and len(model.categories) == 81
    assert not (tmp_path / MARKER).exists()
    # class names held in an object hrnetdet does not unpickle: the default (COCO's) names
    with mmengine_classes() as (_, ConfigDict):
        torch.save({"state_dict": ckpt["state_dict"],
                    "meta": {"dataset_meta": ConfigDict(classes=tuple(f"thing{i}" for i in range(80)))}}, path)
    assert read_checkpoint(str(path)).categories[1] == "person"


def test_malicious_pickle_is_refused_by_name_and_never_run(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save(_Malicious(str(tmp_path)), path)
    with pytest.raises(CheckpointError, match=r"evil.pth: holds objects hrnetdet will not unpickle \(posix.system\)") as e:
        read_checkpoint(str(path))
    assert "weights_only" not in str(e.value)
    torch.save({"state_dict": {"backbone.conv1.weight": _Malicious(str(tmp_path))}}, path)
    with pytest.raises(CheckpointError, match=r"holds objects hrnetdet will not unpickle \(posix.system\)"):
        read_checkpoint(str(path))
    assert not (tmp_path / MARKER).exists()


def test_broken_json_in_a_safetensors_header_names_the_file(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"hrnetdet": '{"architecture": "faster_rcnn_hrnet'})
    with pytest.raises(CheckpointError, match=r"model.safetensors \(its 'hrnetdet' header\): broken JSON"):
        read_checkpoint(str(path))
    (tmp_path / "config.json").write_text("{,}")
    with pytest.raises(CheckpointError, match=r"config.json: broken JSON at line 1, column 2"):
        read_checkpoint(str(path))


def test_truncated_safetensors(tmp_path):
    model = hrnetdet.create_model("faster_rcnn_hrnetv2p_w18")
    hrnetdet.save_pretrained(model, str(tmp_path))
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        hrnetdet.create_model("faster_rcnn_hrnetv2p_w18", checkpoint_path=str(path))
    assert not any(f.endswith(".tmp") or ".tmp" in f for f in os.listdir(tmp_path))
