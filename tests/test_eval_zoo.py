"""tools/eval_zoo.py on a small COCO-format set the test makes, with a tiny weight set (a W18 Faster
R-CNN at a 128-pixel test scale) served by the loopback Hub: the figures are pycocotools' (as
``evaluate`` gives them), a rerun skips what is done, two torchrun processes give the same figures,
and MODEL_ZOO.md's "(hrnetdet)" column is written from the results."""
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hrnetdet
from fake_hub import env, hub  # noqa: F401  (fixtures)
from hrnetdet.data.synthetic import SHAPES, make_shapes_dataset
from hrnetdet.engine.evaluate import evaluate
from hrnetdet.zoo import registry
from hrnetdet.zoo.records import PretrainedCfg
from eval_zoo import main as eval_zoo_main

ROOT = Path(__file__).resolve().parents[1]
ARCH = "faster_rcnn_hrnetv2p_w18"
NAME = f"{ARCH}.shapes"
REPO, COMMIT = "hrnetdet-test/shapes", "d" * 40


def tiny_build_rcnn(width, **kwargs):
    """The W18 Faster R-CNN builder at a 128-pixel test scale, keeping every detection."""
    from hrnetdet.detectors.rcnn import build_rcnn
    return build_rcnn(width, **{"min_size": 128, "max_size": 160, "score_thresh": 0.0, **kwargs})


def tiny_zoo(record):
    """(registry table, key, value) replacements: W18 Faster R-CNN built at a 128-pixel test scale
    keeping every detection, and one weight set ``shapes`` whose Hub fields are ``record``."""
    family, width = registry.get_family(ARCH)
    tiny = dataclasses.replace(family, builder_name="test_eval_zoo:tiny_build_rcnn")
    cfg = PretrainedCfg(ARCH, "shapes", f"{ARCH}_shapes_20260101-00000000.pth", {"box_ap": 50.0}, "1x",
                        categories=("__background__", *SHAPES), **record)
    return [(registry._archs, ARCH, (tiny, width)), (registry._pretrained, ARCH, [cfg])]


@pytest.fixture
def zoo(hub, env, monkeypatch):
    """The tiny weight set on the Hub and in the registry; the COCO folder."""
    torch.manual_seed(0)
    model = hrnetdet.create_model(ARCH, num_classes=4, categories=list(SHAPES))
    hrnetdet.save_pretrained(model, str(env / "weights"))
    data = (env / "weights" / "model.safetensors").read_bytes()
    hub.files[(REPO, COMMIT, "model.safetensors")] = data
    record = {"hf_hub_id": REPO, "hf_revision": COMMIT, "sha256": hashlib.sha256(data).hexdigest()}
    for table, key, value in tiny_zoo(record):
        monkeypatch.setitem(table, key, value)
    coco = env / "coco"
    ann, _ = make_shapes_dataset(str(coco), "val2017", 4, seed=1)
    (coco / "annotations").mkdir()
    os.replace(ann, coco / "annotations" / "instances_val2017.json")
    args = ["--coco", str(coco), "--only", NAME, "--device", "cpu", "--summary", str(env / "coco_eval.json"),
            "--model-zoo", str(env / "MODEL_ZOO.md")]
    return record, coco, args


def test_eval_zoo_figures_resume_sharding_and_model_zoo_column(zoo, env, hub, capsys):
    record, coco, args = zoo
    out = env / "out"
    assert eval_zoo_main(args + ["--out", str(out)]) == 0
    figures = json.loads((out / f"{NAME}.json").read_text())
    expected = evaluate(hrnetdet.create_model(NAME, pretrained=True), str(coco / "annotations" / "instances_val2017.json"),
                        str(coco / "val2017"), progress=False)
    assert expected["num_detections"] > 100  # every detection kept: the comparison has something to compare
    assert figures["bbox"] == expected["bbox"] and figures["num_detections"] == expected["num_detections"]
    assert figures["num_images"] == 4 and figures["processes"] == 1 and figures["device"] == "cpu"
    ap = round(100 * expected["bbox"]["stats"]["AP"], 1)
    assert json.loads((env / "coco_eval.json").read_text()) == {NAME: {"box_ap": ap}}
    row = next(line for line in (env / "MODEL_ZOO.md").read_text().splitlines() if f"`{NAME}`" in line)
    assert row.startswith(f"| `{NAME}` | 1x | 50.0 | {ap:.1f} |"), row
    assert "| 40.2 | pending |" in (env / "MODEL_ZOO.md").read_text()  # the others are not measured yet

    capsys.readouterr()
    hub.requests.clear()
    before = (out / f"{NAME}.json").read_text()
    assert eval_zoo_main(args + ["--out", str(out)]) == 0
    assert "1 of 1 weight sets already evaluated" in capsys.readouterr().out
    assert hub.requests == [] and (out / f"{NAME}.json").read_text() == before  # nothing loaded, nothing redone

    # two torchrun processes, each on every other image: the same figures
    driver = env / "driver.py"
    driver.write_text("import json, sys\n"
                      "from test_eval_zoo import tiny_zoo\n"
                      "for table, key, value in tiny_zoo(json.loads(sys.argv[1])):\n"
                      "    table[key] = value\n"
                      "from eval_zoo import main\n"
                      "sys.exit(main(sys.argv[2:]))\n")
    out = env / "sharded"
    environ = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), str(ROOT / "tools")])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(driver), json.dumps(record), *args, "--out", str(out)],
                          env=environ, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded = json.loads((out / f"{NAME}.json").read_text())
    assert sharded["processes"] == 2 and sharded["num_detections"] == expected["num_detections"]
    assert sharded["bbox"] == expected["bbox"]
