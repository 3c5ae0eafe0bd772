"""Every subcommand, run as a user runs it, with bad arguments, bad files and no network: one line on
stderr (``hrnetdet CMD: error: ...``), exit code 2 (arguments) or 1 (what they name), no traceback, no
object addresses. And the config.json checks behind them, in-process."""
import json
import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hrnetdet.zoo import records
from hrnetdet.zoo.checkpoint import save_pretrained
from hrnetdet.zoo.convert import CheckpointError
from hrnetdet.zoo.config import validate_config
from hrnetdet.zoo.factory import create_model
from hrnetdet.zoo.registry import list_families
from hrnetdet.zoo.records import arch_name

ROOT = Path(__file__).resolve().parents[1]
ARCH = "faster_rcnn_hrnetv2p_w18"
GOOD_CONFIG = {"architecture": ARCH, "family": "faster_rcnn", "width": 18, "num_classes": 3,
               "categories": ["__background__", "a", "b"], "category_ids": [None, 1, 2], "build_args": {}}
# config.json edits a user (or an attacker) may make: (the edit, the field the error must name)
BAD_CONFIGS = {
    "unknown_key": ({"build_args": {"min_sise": 800}}, "build_args.min_sise"),
    "list_build_args": ({"build_args": [800]}, "build_args"),
    "string_num_classes": ({"num_classes": "3"}, "num_classes"),
    "zero_min_size": ({"build_args": {"min_size": [0]}}, "build_args.min_size"),
    "huge_num_classes": ({"num_classes": 1e9}, "num_classes"),
    "categories_misfit": ({"categories": ["a", "b", "c", "d"]}, "categories"),
    "threshold_out_of_range": ({"build_args": {"box_score_thresh": 5}}, "build_args.box_score_thresh"),
    "bool_as_string": ({"build_args": {"norm_eval": "no"}}, "build_args.norm_eval"),
    "not_a_setting_of_this_family": ({"build_args": {"semantic": True}}, "build_args.semantic"),
    "not_json": ("{'architecture': ", "broken JSON"),
}


def _weights_folder(folder: Path, config) -> Path:
    """A safetensors file with a config.json beside it (the file is read, never loaded into a model)."""
    folder.mkdir(parents=True)
    save_file({"x": torch.zeros(1)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return folder / "model.safetensors"


def _closed_port() -> int:
    """A loopback port nothing listens on: a connection to it is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return _make_files(tmp_path_factory.mktemp("cli_errors"))


def _make_files(d: Path) -> Path:
    (d / "empty.pth").touch()
    (d / "a.jpg").touch()
    (d / "a_file").write_text("not a folder")
    (d / "ann.json").write_text("{}")
    for name, (edit, _) in BAD_CONFIGS.items():
        _weights_folder(d / name, edit if isinstance(edit, str) else {**GOOD_CONFIG, **edit})
    run = d / "run" / "best"
    _weights_folder(run, GOOD_CONFIG)
    (d / "home").mkdir()
    return d


# (name, argv with {d} for the files' folder, extra environment, exit code, a text the message holds)
CASES = [
    # bad arguments and missing files: refused by the parser, before torch is imported
    ("train_missing_ann", "train --model {arch} --train-ann {d}/nope.json --train-images {d} --out {d}/o --iters 1",
     {}, 2, "--train-ann: file not found"),
    ("train_zero_iters", "train --model {arch} --train-ann {d}/ann.json --train-images {d} --out {d}/o --iters 0",
     {}, 2, "--iters"),
    ("train_missing_checkpoint", "train --model {arch} --checkpoint {d}/nope.pth --train-ann {d}/ann.json "
     "--train-images {d} --out {d}/o --iters 1", {}, 2, "--checkpoint: file not found"),
    ("train_out_is_a_file", "train --model {arch} --train-ann {d}/ann.json --train-images {d} --out {d}/a_file "
     "--iters 1", {}, 2, "--out"),
    ("eval_missing_checkpoint", "eval --model {arch} --checkpoint {d}/nope.pth --ann {d}/ann.json --images {d}",
     {}, 2, "--checkpoint: file not found"),
    ("eval_zero_min_size", "eval --model {arch} --checkpoint {d}/empty.pth --ann {d}/ann.json --images {d} "
     "--min-size 0", {}, 2, "--min-size"),
    ("predict_missing_checkpoint", "predict {d}/a.jpg --model {arch} --checkpoint {d}/nope.pth", {}, 2,
     "--checkpoint: file not found"),
    ("predict_checkpoint_is_a_folder", "predict {d}/a.jpg --model {arch} --checkpoint {d}", {}, 2,
     "not a regular file"),
    ("predict_zero_batch", "predict {d}/a.jpg --model {arch} --checkpoint {d}/empty.pth --batch-size 0", {}, 2,
     "--batch-size"),
    ("predict_zero_slice", "predict {d}/a.jpg --model {arch} --checkpoint {d}/empty.pth --slice 0", {}, 2, "--slice"),
    ("models_extra_argument", "models a b", {}, 2, "unrecognized arguments"),
    ("download_no_names", "download", {}, 2, "names"),
    ("download_dir_is_a_file", "download {arch}.coco_1x --dir {d}/a_file", {}, 2, "--dir"),
    ("convert_missing_file", "convert {d}/nonexistent.pth --out {d}/o", {}, 2, "checkpoint: file not found"),
    ("push_missing_run", "push {d}/nope --repo me/x", {}, 2, "RUN_DIR: folder not found"),
    ("export_zero_min_size", "export {arch} --checkpoint {d}/empty.pth --format torchscript --out {d}/exported "
     "--min-size 0", {}, 2, "--min-size"),
    ("export_bad_format", "export {arch} --format tflite --out {d}/exported", {}, 2, "--format"),
    ("export_out_is_a_file", "export {arch} --format onnx --out {d}/a_file", {}, 2, "--out"),
    # bad files: read after torch is imported, refused before a model is built (every bad config.json
    # of BAD_CONFIGS is tried in-process below)
    ("convert_empty_checkpoint", "convert {d}/empty.pth --out {d}/o", {}, 1, "empty.pth"),
    ("predict_config_string_num_classes", "predict {d}/a.jpg --model {arch} --checkpoint "
     "{d}/string_num_classes/model.safetensors --out {d}/p", {}, 1, "config.json: num_classes must be"),
    ("export_config_zero_min_size", "export {arch} --checkpoint {d}/zero_min_size/model.safetensors "
     "--format torchscript --out {d}/exported", {}, 1, "config.json: build_args.min_size must be"),
    ("eval_config_categories_misfit", "eval --model {arch} --checkpoint {d}/categories_misfit/model.safetensors "
     "--ann {d}/ann.json --images {d}", {}, 1, "config.json: categories holds 4 names"),
    # no network
    ("push_unreachable", "push {d}/run --repo me/x", {"HF_ENDPOINT": "http://127.0.0.1:{port}", "HF_TOKEN": "x"},
     1, "could not push to me/x"),
    ("download_unreachable", "download {arch}.coco_1x --dir {d}/dl",
     {"HRNETDET_REFERENCE_URL": "http://127.0.0.1:{port}"}, 1, "could not download"),
    ("predict_hub_offline", "predict {d}/a.jpg --model hf-hub:me/x --pretrained --out {d}/p",
     {"HF_HUB_OFFLINE": "1"}, 1, "offline"),
]


def _run(argv: str, env, d: Path, port: int) -> subprocess.CompletedProcess:
    fill = dict(d=d, arch=ARCH, port=port)
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HRNETDET_HOME": str(d / "home"),
                   "HF_HOME": str(d / "home"), "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                   **{k: v.format(**fill) for k, v in env.items()}}
    return subprocess.run([sys.executable, "-m", "hrnetdet.cli", *argv.format(**fill).split()],
                          capture_output=True, text=True, env=environment, timeout=240)


@pytest.fixture(scope="module")
def results(files):
    """Every case run once, two at a time (most of their time is importing torch)."""
    port = _closed_port()
    with ThreadPoolExecutor(2) as pool:
        runs = {name: pool.submit(_run, argv, env, files, port) for name, argv, env, *_ in CASES}
        return {name: run.result() for name, run in runs.items()}


@pytest.mark.parametrize("name,argv,env,code,text", CASES, ids=[c[0] for c in CASES])
def test_one_line_error(name, argv, env, code, text, results, files):
    proc = results[name]
    command = argv.split()[0]
    assert (proc.returncode, proc.stdout) == (code, ""), proc.stderr
    assert "Traceback" not in proc.stderr and " at 0x" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"hrnetdet {command}: error: "), proc.stderr
    assert text in proc.stderr
    if command == "export":
        assert not (files / "exported").exists()  # nothing written before the arguments and the model are checked


def test_missing_file_is_reported_before_torch_is_imported(tmp_path):
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "hrnetdet.cli", "convert",
                           str(tmp_path / "nonexistent.pth"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert proc.returncode == 2 and "file not found" in proc.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "hrnetdet.threads" in imported and "torch" not in imported  # the import log is complete


@pytest.mark.parametrize("name", BAD_CONFIGS)
def test_bad_config_is_refused_before_a_model_is_built(name, files, monkeypatch):
    def build(*args, **kwargs):
        raise AssertionError("a model was built from a bad config.json")
    monkeypatch.setattr(records.Family, "build", build)
    field = BAD_CONFIGS[name][1]
    with pytest.raises(CheckpointError) as error:
        create_model(ARCH, checkpoint_path=str(files / name / "model.safetensors"))
    message = str(error.value)
    assert message.startswith(f"{files / name / 'config.json'}: {field} ") and "\n" not in message


def test_what_save_pretrained_writes_passes(tmp_path):
    """The record of a model of each family, written whole by save_pretrained (schema 2), passes the
    check and rebuilds the same record."""
    changes = {"min_size": (640, 672), "max_size": 1000, "norm_eval": False, "frozen_stages": 1,
               "image_mean": (0.5, 0.5, 0.5)}
    for family in list_families():
        arch = arch_name(family.name, 18)
        with torch.device("meta"):
            model = family.build(18, **changes)
        config = {"schema_version": 2, "architecture": arch, "num_classes": 81,
                  "build_args": model.settings.to_dict()}
        assert validate_config(config, "config.json", arch) == model.settings
        assert config["build_args"]["min_size"] == [640, 672] and config["build_args"]["frozen_stages"] == 1


def test_builder_keywords_get_the_same_checks():
    with pytest.raises(ValueError, match=r"^min_size must be a number of pixels from 1 to 10000, got 0$"):
        create_model(ARCH, min_size=0)
    with pytest.raises(ValueError, match=r"^max_size must be .* got 20000$"):
        create_model(ARCH, max_size=20000)
    with pytest.raises(ValueError, match=r"^box_score_thresh must be from 0 to 1, got 5"):
        create_model(ARCH, box_score_thresh=5)  # an earlier name is named as given


def test_export_whose_check_fails_leaves_nothing_in_out(tmp_path, monkeypatch):
    """The export-time check runs on the files in a temporary folder: a failing check (``min_size``
    0 failed there with a ZeroDivisionError) leaves no unchecked file in ``out`` and no folder."""
    from hrnetdet.inference import export as export_module

    def write_graphs(model, image, out_dir, **kwargs):
        (Path(out_dir) / "backbone.onnx").write_bytes(b"graph")
        (Path(out_dir) / export_module.MANIFEST).write_text("{}")

    def failing_check(model, export_dir, backend):
        assert sorted(os.listdir(export_dir)) == ["backbone.onnx", export_module.MANIFEST]
        return lambda images: 1 / 0
    monkeypatch.setattr(export_module, "export_parts", write_graphs)
    monkeypatch.setattr(export_module, "attach", failing_check)
    out = tmp_path / "out"
    with pytest.raises(ZeroDivisionError):
        export_module.export(torch.nn.Identity(), str(out), "onnx")
    assert not out.exists()
    out.mkdir()
    (out / "kept.txt").write_text("the user's")
    with pytest.raises(ZeroDivisionError):
        export_module.export(torch.nn.Identity(), str(out), "onnx")
    assert os.listdir(out) == ["kept.txt"]


def test_warnings_are_one_line_without_source():
    from hrnetdet.cli import one_line_warning
    line = one_line_warning(UserWarning("a\n  warning about <object at 0x7f3a>"), UserWarning, "x.py", 3,
                            "    warnings.warn(...)")
    assert line == "hrnetdet: warning: a warning about <object>\n"


@pytest.mark.slow
def test_unreachable_hub_download_is_one_line(files):
    """huggingface_hub retries for about 23 s and logs each try; the CLI says only why it failed."""
    proc = _run("download --backbone hrnet_w18.ms_in1k", {"HF_ENDPOINT": "http://127.0.0.1:{port}"}, files,
                _closed_port())
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("hrnetdet download: error: the Hub (http://127.0.0.1:")


def test_push_checks_the_run_config_first(files, tmp_path):
    """A run whose config.json is not one save_pretrained could have written is refused before the
    model card is written or the Hub is asked (it was a KeyError traceback)."""
    from hrnetdet.zoo.push import push_run
    run = tmp_path / "run"
    _weights_folder(run / "best", {"architecture": ARCH, "num_classes": 3})  # no categories
    with pytest.raises(CheckpointError, match=r"best/config.json: no 'categories'"):
        push_run(str(run), "me/x")
    (run / "best" / "config.json").write_text(json.dumps({**GOOD_CONFIG, "build_args": {"min_size": [0]}}))
    with pytest.raises(CheckpointError, match=r"best/config.json: build_args.min_size must be"):
        push_run(str(run), "me/x")
