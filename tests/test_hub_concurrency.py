"""Several processes fetching and converting the same reference checkpoint into one HRNETDET_HOME
(torchrun ranks with --pretrained): started at once and staggered, every one gets the converted
weights, which are downloaded and converted once."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import hrnetdet
from fake_hub import env, hub, serve_reference  # noqa: F401  (fixtures)
from reference_layout import reference_checkpoint

ROOT = Path(__file__).resolve().parents[1]
RECORD = "faster_rcnn_hrnetv2p_w32.coco_1x"
FETCH = """
import dataclasses, sys
import hrnetdet
from hrnetdet.zoo.checkpoint import read_checkpoint
from hrnetdet.zoo.hub import fetch_pretrained
cfg = dataclasses.replace(hrnetdet.get_pretrained_cfg(sys.argv[1]), reference_file=sys.argv[2])
path = fetch_pretrained(cfg)
print(path, len(read_checkpoint(path).state_dict))
"""


@pytest.mark.slow  # four processes each import torch and read a W32 checkpoint: about a minute
def test_concurrent_and_staggered_processes_share_one_conversion(hub, env, tmp_path, monkeypatch):
    ckpt = reference_checkpoint("faster_rcnn")
    path = tmp_path / "reference.pth"
    torch.save(ckpt, path)
    cfg, served = serve_reference(hub, monkeypatch, path.read_bytes(), RECORD)
    name = cfg.reference_file
    process_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    def start():
        return subprocess.Popen([sys.executable, "-c", FETCH, RECORD, name], env=process_env, cwd=str(tmp_path),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    procs = [start(), start()]  # at once
    downloaded = env / "home" / "reference" / name
    deadline = time.monotonic() + 300
    while not downloaded.exists() and all(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    procs.append(start())  # staggered: the reference file is there, its conversion under way
    procs[0].wait(timeout=600)
    procs.append(start())  # after the first has finished
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    converted = {out.split()[0] for out, _ in outs}
    assert converted == {str(env / "home" / "converted" / RECORD / "model.safetensors")}
    assert {out.split()[1] for out, _ in outs} == {str(len(hrnetdet.create_model("faster_rcnn_hrnetv2p_w32").state_dict()))}
    assert hub.gets(served) == [served]  # downloaded once
    assert not downloaded.exists()  # the converted file replaced it
