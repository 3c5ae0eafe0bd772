"""The command line as a user meets it: help without importing torch, one-line errors that name
flags, ``--version`` and the thread count."""
import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hrnetdet.threads
from hrnetdet.cli import main
from hrnetdet.threads import default_num_threads, physical_cores, set_num_threads

ROOT = Path(__file__).resolve().parents[1]
ARCH = "faster_rcnn_hrnetv2p_w18"


@pytest.fixture
def image(tmp_path) -> str:
    """An image path for predict; these tests fail before it is read."""
    path = tmp_path / "a.jpg"
    path.touch()
    return str(path)


def _run_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env}, timeout=300)


@pytest.mark.parametrize("argv", [["--help"], ["predict", "--help"]])
def test_help_does_not_import_torch(argv):
    proc = _run_cli("-X", "importtime", "-m", "hrnetdet.cli", *argv)
    assert proc.returncode == 0 and "usage: hrnetdet" in proc.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert {"hrnetdet", "hrnetdet.threads", "argparse"} <= imported  # the import log is complete
    assert not {name for name in imported if name.split(".")[0] in ("torch", "torchvision")}


def test_submodule_import_and_attribute_probes_do_not_import_torch():
    """``from hrnetdet import cli`` and ``hasattr`` first ask the package for the name (PEP 562)."""
    code = ("import sys, hrnetdet; from hrnetdet import cli; assert not hasattr(hrnetdet, '__wrapped__'); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')))")
    proc = _run_cli("-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_version_is_the_package_version(capsys):
    version = importlib.metadata.version("hrnetdet")  # what pip installed, from pyproject's dynamic version
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"hrnetdet {version}"


def test_unknown_model_is_one_line_naming_the_flag(image):
    proc = _run_cli("-m", "hrnetdet.cli", "predict", image, "--model", "faster_rcnn_hrnet_w99",
                    "--checkpoint", image)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("hrnetdet predict: error: argument --model: ")
    assert "faster_rcnn_hrnet_w99" in proc.stderr and "`hrnetdet models` lists" in proc.stderr


def _error(argv, capsys) -> str:
    """The message a failing command exits with; nothing else may reach stderr (no traceback)."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    message = exit_.value.code if isinstance(exit_.value.code, str) else capsys.readouterr().err
    assert capsys.readouterr().err == "" and message.count("\n") <= 1
    return message.strip()


def test_missing_checkpoint_names_the_flag(tmp_path, capsys):
    missing = str(tmp_path / "missing.pth")
    message = _error(["eval", "--model", ARCH, "--checkpoint", missing, "--ann", __file__, "--images",
                      str(tmp_path)], capsys)
    assert message == f"hrnetdet eval: error: argument --checkpoint: file not found: {missing}"


def test_missing_data_fails_before_the_model_is_built(tmp_path, capsys):
    message = _error(["train", "--model", ARCH, "--train-ann", __file__, "--train-images", str(tmp_path / "nope"),
                      "--out", str(tmp_path), "--iters", "1"], capsys)
    assert message == f"hrnetdet train: error: argument --train-images: folder not found: {tmp_path / 'nope'}"
    message = _error(["predict", "x.jpg", "--model", ARCH], capsys)  # no weights given
    assert "--checkpoint" in message and "--pretrained" in message


def test_python_argument_names_become_flags(image, tmp_path, capsys, monkeypatch):
    # Offline with an empty cache, the library's advice to pass ``checkpoint_path=`` is the CLI's --checkpoint.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HRNETDET_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    message = _error(["predict", image, "--model", ARCH, "--pretrained", "coco_1x"], capsys)
    assert message.startswith("hrnetdet predict: error: ") and "offline" in message
    assert "--checkpoint" in message and "checkpoint_path" not in message


def test_debug_shows_the_original_error(image, monkeypatch):
    argv = ["predict", image, "--model", "nope", "--checkpoint", image]
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        main([*argv, "--debug"])
    monkeypatch.setenv("HRNETDET_DEBUG", "1")
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        main(argv)


def test_default_threads_leave_busy_cores_alone(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(hrnetdet.threads, "physical_cores", lambda: 4)
    for load, threads in ((0.2, 4), (1.4, 3), (2.6, 1), (9.0, 1)):
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, 0.0, 0.0))
        assert default_num_threads() == threads
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's (or torchrun's) choice wins
    assert default_num_threads() == 3


@pytest.mark.skipif(not shutil.which("lscpu") or not hasattr(os, "sched_getaffinity"), reason="needs Linux lscpu")
def test_physical_cores_match_lscpu():
    lines = subprocess.run(["lscpu", "-p=CPU,CORE,SOCKET"], capture_output=True, text=True).stdout.splitlines()
    rows = [line.split(",") for line in lines if not line.startswith("#")]
    allowed = os.sched_getaffinity(0)
    assert physical_cores() == len({(socket, core) for cpu, core, socket in rows if int(cpu) in allowed})


def test_threads_flag_sets_torch_threads(capsys):
    before = torch.get_num_threads()
    try:
        assert main(["models", "*w18*", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1 and torch.get_num_interop_threads() == 1
        assert set_num_threads(2) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert ARCH in capsys.readouterr().out
