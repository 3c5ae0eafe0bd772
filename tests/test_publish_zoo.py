"""tools/publish_zoo.py end to end against the loopback Hub (tests/fake_hub.py): two W18 records are
converted from fake reference checkpoints, uploaded and pinned in a copy of the registry's data
file; pretrained=True then loads them from the Hub at the written commit, a tampered file is refused
by its checksum, a gone repository falls back to the reference, a second run uploads nothing, and
one after an interrupted run adopts what that run uploaded."""
import dataclasses
import hashlib
import json
import logging
import shutil
import time

import pytest
import torch
from safetensors.torch import load

import hrnetdet
from fake_hub import env, hub, serve_reference  # noqa: F401  (fixtures)
from hrnetdet.zoo import registry
from hrnetdet.zoo.convert import CheckpointError
from hrnetdet.zoo.models import HUB_FILE, hub_fields
from publish_zoo import main as publish_main
from reference_layout import reference_checkpoint

ARCH = "faster_rcnn_hrnetv2p_w18"
RECORDS = (f"{ARCH}.coco_1x", f"{ARCH}.coco_2x")
ORG = "hrnetdet-test"


@pytest.fixture(scope="module")
def reference_w18(tmp_path_factory):
    """A W18 Faster R-CNN checkpoint in the reference's layout (random values): its .pth bytes and
    the state dict of its direct conversion."""
    path = tmp_path_factory.mktemp("reference") / "faster_rcnn_w18.pth"
    torch.save(reference_checkpoint("faster_rcnn", width=18), path)
    return path.read_bytes(), hrnetdet.create_model(ARCH, checkpoint_path=str(path)).state_dict()


def _pinned(monkeypatch, table):
    """The registry as models.py builds it from ``table`` (the data file the tool wrote)."""
    cfgs = [dataclasses.replace(c, **table.get(c.name, {})) for c in registry._pretrained[ARCH]]
    monkeypatch.setitem(registry._pretrained, ARCH, cfgs)


def _same(model, sd):
    own = model.state_dict()
    return own.keys() == sd.keys() and all(torch.equal(own[k], sd[k]) for k in sd)


def test_publish_two_records_then_load_them_pinned(hub, env, monkeypatch, reference_w18, capsys, caplog):
    data, converted = reference_w18
    served = [serve_reference(hub, monkeypatch, data, name)[1] for name in RECORDS]
    data_file = env / "published.json"
    shutil.copyfile(HUB_FILE, data_file)
    argv = ["--org", ORG, "--only", f"{ARCH}.*", "--data-file", str(data_file)]

    started = time.perf_counter()
    assert publish_main(argv) == 0
    with capsys.disabled():
        print(f"\nloopback publish of {len(RECORDS)} records: {time.perf_counter() - started:.1f} s")
    assert "2 published, 0 unchanged, 0 failed" in capsys.readouterr().out
    table = hub_fields(data_file)
    assert sorted(table) == sorted(RECORDS)
    for name in RECORDS:
        repo = f"{ORG}/{name}"
        entry = table[name]
        commit = hub.refs[(repo, "main")]
        assert entry == {"hf_hub_id": repo, "hf_revision": commit, "sha256": entry["sha256"]}
        files = {n: b for (r, c, n), b in hub.files.items() if r == repo and c == commit}
        assert set(files) == {"model.safetensors", "config.json", "README.md"}
        assert hashlib.sha256(files["model.safetensors"]).hexdigest() == entry["sha256"]
        weights = load(files["model.safetensors"])
        assert weights.keys() == converted.keys() and all(torch.equal(weights[k], converted[k]) for k in converted)
        card = files["README.md"].decode()
        for text in (f'create_model("{name}", pretrained=True)', f'create_model("hf-hub:{repo}", pretrained=True)',
                     f'torch.hub.load("path/to/hrnetdet", "{ARCH}", source="local", pretrained="{name.split(".")[1]}")',
                     "100% matched (6 images)", "losses <= 1e-07", "license: apache-2.0", "@article{sun2019hrnetv2",
                     "the reference was not run on this file"):
            assert text in card, (name, text)
    assert all(len(hub.gets(path)) == 1 for path in served)  # each reference downloaded once

    # pretrained=True: the pinned commit from the Hub, checked, with nothing else fetched
    _pinned(monkeypatch, table)
    shutil.rmtree(env / "home")  # the conversions the tool cached: the Hub must serve the weights
    hub.requests.clear()
    model = hrnetdet.create_model(RECORDS[0], pretrained=True)
    assert _same(model, converted)
    entry = table[RECORDS[0]]
    assert hub.gets() == [f"/{entry['hf_hub_id']}/resolve/{entry['hf_revision']}/model.safetensors"]

    # a tampered file (same size) is refused by its sha256, and not worked around
    repo, commit = table[RECORDS[1]]["hf_hub_id"], table[RECORDS[1]]["hf_revision"]
    good = hub.files[(repo, commit, "model.safetensors")]
    hub.files[(repo, commit, "model.safetensors")] = good[:-1] + bytes([good[-1] ^ 1])
    with pytest.raises(CheckpointError, match=table[RECORDS[1]]["sha256"]):
        hrnetdet.create_model(RECORDS[1], pretrained=True)
    assert not any("/ref/" in p for p in hub.gets())
    hub.files[(repo, commit, "model.safetensors")] = good

    # a second run finds both published: no download, no upload, the data file unchanged
    before = data_file.read_text()
    hub.requests.clear()
    assert publish_main(argv) == 0
    assert "0 published, 2 unchanged, 0 failed" in capsys.readouterr().out
    assert [m for m, _, _ in hub.requests if m != "HEAD"] == [] and data_file.read_text() == before

    # a run stopped after an upload but before writing the data file: the next one converts again and
    # adopts the repository's main (the same file), uploading nothing
    data_file.write_text(json.dumps({RECORDS[0]: table[RECORDS[0]]}))
    hub.requests.clear()
    assert publish_main(argv) == 0
    assert f"{RECORDS[1]}: already on {repo}@{commit} (adopted)" in capsys.readouterr().out
    assert not [p for m, p, _ in hub.requests if m == "POST"] and hub_fields(data_file) == table


def test_reference_is_the_fallback_when_the_repository_is_gone(hub, monkeypatch, reference_w18, caplog):
    data, converted = reference_w18
    serve_reference(hub, monkeypatch, data, RECORDS[0])
    _pinned(monkeypatch, {RECORDS[0]: {"hf_hub_id": f"{ORG}/gone", "hf_revision": "c" * 40, "sha256": "0" * 64}})
    with caplog.at_level(logging.WARNING, logger="hrnetdet"):
        model = hrnetdet.create_model(RECORDS[0], pretrained=True)
    assert _same(model, converted)
    assert "falling back to the reference checkpoint" in caplog.text
    assert [p for p in hub.gets() if "/ref/" in p]


def test_dry_run_lists_repositories_and_sizes_without_requests(hub, env, capsys):
    data_file = env / "published.json"
    data_file.write_text(json.dumps({RECORDS[0]: {"hf_hub_id": f"{ORG}/{RECORDS[0]}", "hf_revision": "a" * 40,
                                                  "sha256": "0" * 64}}))
    assert publish_main(["--org", ORG, "--only", f"{ARCH}.*", "--data-file", str(data_file), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"{RECORDS[0]}: pinned, checked on the Hub -> {ORG}/{RECORDS[0]}" in out
    assert f"{RECORDS[1]}: to upload -> {ORG}/{RECORDS[1]}: model.safetensors (~105 MiB)" in out
    assert "2 weight sets, ~0.10 GiB to upload" in out and hub.requests == []


def test_unknown_pattern_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as e:
        publish_main(["--org", ORG, "--only", "nothing_*"])
    assert e.value.code == 2 and "matches no weight set" in capsys.readouterr().err
