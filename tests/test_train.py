"""Training: the reference's recipes, repeatable runs and exact resume after a SIGKILL with validation
on, EMA, early stopping, logs and curves, target checks, gradient checkpointing, the non-finite
guard, two-process gloo DDP, the CLI, and short fine-tunes of each family evaluated with pycocotools."""
import copy
import errno
import importlib.util
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
import safetensors.torch
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_post_hook

import hrnetdet
from hrnetdet import fit
from hrnetdet.backbone import HRNet
from hrnetdet.cli import main as cli_main
from hrnetdet.data import CocoDetection, make_shapes_dataset
from hrnetdet.engine.curves import loss_keys, plot_curves
from hrnetdet.engine import train as train_module
from hrnetdet.engine.train import (Plan, TrainConfig, TrainingStateError, _Metrics, default_schedule, lr_factor,
                                    param_groups)
from hrnetdet.zoo.recipe import FCOS_RECIPE, RCNN_RECIPE

RPN_SMALL = dict(rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50, rpn_pre_nms_top_n_test=50,
                 rpn_post_nms_top_n_test=50, box_batch_size_per_image=32)


def tiny_model(arch, seed=0, **kwargs):
    """W18 at 64-80 px with few proposals: seconds per step on a CPU."""
    torch.manual_seed(seed)
    extra = dict(topk_candidates=100) if arch.startswith("fcos") else RPN_SMALL
    return hrnetdet.create_model(arch, num_classes=4, min_size=64, max_size=80, **{**extra, **kwargs})


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shapes"))
    sizes = ((80, 64), (64, 80))
    train = make_shapes_dataset(root, "train", 4, seed=0, sizes=sizes, min_radius=8, max_radius=20)
    val = make_shapes_dataset(root, "val", 2, seed=1, sizes=sizes, min_radius=8, max_radius=20)
    return train, val


def test_recipes():
    assert lr_factor(0, [600, 900], 500, RCNN_RECIPE) == pytest.approx(0.001)
    assert lr_factor(250, [600, 900], 500, RCNN_RECIPE) == pytest.approx(0.5005)
    assert lr_factor(500, [600, 900], 500, RCNN_RECIPE) == 1.0
    assert lr_factor(600, [600, 900], 500, RCNN_RECIPE) == pytest.approx(0.1)
    assert lr_factor(950, [600, 900], 500, RCNN_RECIPE) == pytest.approx(0.01)
    assert lr_factor(10, [600, 900], 500, FCOS_RECIPE) == pytest.approx(1 / 3)
    assert [default_schedule(a) for a in ("faster_rcnn_hrnetv2p_w18", "mask_rcnn_hrnetv2p_w32",
                                          "cascade_rcnn_hrnetv2p_w18", "htc_hrnetv2p_w18", "fcos_hrnetv2p_w18")] \
        == ["1x", "1x", "20e", "20e", "1x"]
    model = hrnetdet.create_model("fcos_hrnetv2p_w18", num_classes=4)
    plain, bias = param_groups(model, 0.01, 1e-4, FCOS_RECIPE)
    assert (bias["lr"], bias["weight_decay"], plain["lr"], plain["weight_decay"]) == (0.02, 0.0, 0.01, 1e-4)
    norm_biases = {id(m.bias) for m in model.modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.BatchNorm2d))}
    assert not norm_biases & {id(p) for p in bias["params"]} and norm_biases <= {id(p) for p in plain["params"]}
    assert len(param_groups(model, 0.02, 1e-4, RCNN_RECIPE)) == 1


def test_amp_needs_cuda(shapes, tmp_path):
    (ann, images), _ = shapes
    with pytest.raises(ValueError, match="amp needs a CUDA device"):
        fit(tiny_model("faster_rcnn_hrnetv2p_w18"), ann, images, out_dir=str(tmp_path), iters=1, amp=True, device="cpu")


def _weights(path):
    return load_file(os.path.join(path, "last", "model.safetensors"))


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(v, b[k]) for k, v in a.items())


def test_the_same_train_command_twice_gives_identical_weights(shapes, tmp_path):
    (ann, images), _ = shapes
    for run in ("a", "b"):  # the second starts from wherever the first left the global RNG
        assert cli_main(["train", "--model", "faster_rcnn_hrnetv2p_w18", "--train-ann", ann, "--train-images",
                         images, "--out", str(tmp_path / run), "--iters", "1", "--batch-size", "1", "--min-size",
                         "64", "--max-size", "80", "--workers", "0", "--lr", "0.005"]) == 0
    assert _same(_weights(tmp_path / "a"), _weights(tmp_path / "b"))


# A fresh process that trains the tiny model and kills itself with SIGKILL once its first training
# state is saved.
KILLED_AFTER_FIRST_CHECKPOINT = """
import json, os, signal, sys
import torch, hrnetdet
from hrnetdet.engine.train import TrainState
save = TrainState.save
def save_then_die(self, *args, **kwargs):
    save(self, *args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
TrainState.save = save_then_die
torch.manual_seed(0)
model = hrnetdet.create_model("faster_rcnn_hrnetv2p_w18", num_classes=4, min_size=64, max_size=80, **json.loads(sys.argv[1]))
hrnetdet.fit(model, *sys.argv[2:6], out_dir=sys.argv[6], **json.loads(sys.argv[7]))
"""


def test_a_run_sigkilled_with_validation_on_resumes_to_identical_weights(shapes, tmp_path):
    """Neither validation nor checkpointing moves the training RNG streams; a finished run resumed
    reports its final metrics; an unreadable state names itself and last/; orphans are removed."""
    (ann, images), (val_ann, val_images) = shapes
    kw = dict(iters=4, batch_size=1, lr=0.005, checkpoint_every=2, log_every=1, progress=False)
    straight = tiny_model("faster_rcnn_hrnetv2p_w18")
    done = fit(straight, ann, images, val_ann, val_images, out_dir=str(tmp_path / "straight"), **kw)

    run = tmp_path / "killed"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the same arithmetic as this process
    proc = subprocess.Popen([sys.executable, "-c", KILLED_AFTER_FIRST_CHECKPOINT, json.dumps(RPN_SMALL), ann, images,
                             val_ann, val_images, str(run), json.dumps(kw)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _, stderr = proc.communicate(timeout=900)
    assert proc.returncode == -signal.SIGKILL, stderr[-2000:]
    assert torch.load(run / "training_state.pt", weights_only=True)["iteration"] == 2
    orphan = run / "last" / f"model.safetensors.tmp{proc.pid}"  # as if killed while writing
    orphan.write_bytes(b"partial")
    resumed = fit(tiny_model("faster_rcnn_hrnetv2p_w18", seed=123), ann, images, val_ann, val_images,
                  out_dir=str(run), resume=True, **kw)
    assert not orphan.exists()
    assert _same(_weights(tmp_path / "straight"), _weights(run)) and resumed["val"] == done["val"]
    assert [json.loads(line)["iter"] for line in open(run / "metrics.jsonl")] == [1, 2, 2, 3, 4, 4]
    assert (run / "metrics.csv").read_text().count("\n") == 7

    again = fit(tiny_model("faster_rcnn_hrnetv2p_w18"), ann, images, val_ann, val_images, out_dir=str(run),
                resume=True, **kw)
    assert again["iterations"] == 4 and again["val"] == done["val"] and "bbox_AP" in again["val"]

    state = run / "training_state.pt"
    state.write_bytes(state.read_bytes()[:4096])  # truncated, e.g. by a full disk
    with pytest.raises(TrainingStateError, match=f"{state} is unreadable.*{run / 'last' / 'model.safetensors'}"):
        fit(tiny_model("faster_rcnn_hrnetv2p_w18"), ann, images, out_dir=str(run), resume=True, **kw)


def _full_disk_at_call(monkeypatch, module, name, n):
    """``module.name`` raising ENOSPC at its n-th call, as a full disk makes a write fail."""
    real, calls = getattr(module, name), [0]

    def full(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, full)


def _recorded_iterations(run):
    """(last/config.json's iteration, training_state.pt's)."""
    return (json.load(open(run / "last" / "config.json"))["iteration"],
            torch.load(run / "training_state.pt", weights_only=True)["iteration"])


@pytest.mark.parametrize("full_at", ["training_state.pt", "last"])
def test_a_full_disk_ends_naming_the_file_and_leaves_last_and_the_state_at_one_iteration(shapes, tmp_path,
                                                                                        monkeypatch, caplog, full_at):
    """Before: last/ one checkpoint ahead of training_state.pt, and an error naming no file."""
    (ann, images), _ = shapes
    kw = dict(iters=2, batch_size=1, lr=0.005, checkpoint_every=1, log_every=1, progress=False, aug="none")
    if full_at == "last":
        _full_disk_at_call(monkeypatch, safetensors.torch, "save_file", 2)
    else:
        _full_disk_at_call(monkeypatch, torch, "save", 2)
    message = rf"No space left on device: cannot write {re.escape(str(tmp_path / full_at))} \(the checkpoint of iteration 1 is kept"
    with pytest.raises(OSError, match=message) as failure:
        fit(tiny_model("faster_rcnn_hrnetv2p_w18"), ann, images, out_dir=str(tmp_path), **kw)
    assert "\n" not in str(failure.value)  # the CLI's one line
    monkeypatch.undo()
    assert _recorded_iterations(tmp_path) == (1, 1)
    assert not [name for name in os.listdir(tmp_path) if ".tmp" in name]
    if full_at == "last":
        return
    # As if killed between the state's write and last/'s: resume rewrites last/ from the state.
    os.remove(tmp_path / "last" / "config.json")
    with caplog.at_level(logging.INFO, logger="hrnetdet"):
        fit(tiny_model("faster_rcnn_hrnetv2p_w18", seed=7), ann, images, out_dir=str(tmp_path), resume=True,
            **{**kw, "iters": 1})
    assert _recorded_iterations(tmp_path) == (1, 1)
    assert _same(_weights(tmp_path), torch.load(tmp_path / "training_state.pt", weights_only=True)["model"])
    assert "was at iteration None" in caplog.text and "rewrote last/ from the training state" in caplog.text


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path, caplog):
    """Before: a JSONDecodeError naming no file, at every --resume."""
    records = [{"type": "train", "iter": 1, "loss": 2.0}, {"type": "val", "iter": 2, "bbox_AP": 0.1},
               {"type": "train", "iter": 3, "loss": 1.0}]
    lines = [json.dumps(r) + "\n" for r in records]
    (tmp_path / "metrics.jsonl").write_text("".join(lines) + '{"type": "train", "iter": 4, "lo')
    with caplog.at_level(logging.INFO, logger="hrnetdet"):
        _Metrics(str(tmp_path), 2, True).close()
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(lines[:2])
    assert f"{tmp_path / 'metrics.jsonl'}: dropped unreadable line(s) 4 (torn" in caplog.text


def test_a_metrics_record_that_cannot_be_written_names_the_file(tmp_path, monkeypatch):
    metrics = _Metrics(str(tmp_path), None, True)
    monkeypatch.setattr(train_module, "open_no_follow", lambda path, mode: open("/dev/full", mode))
    with pytest.raises(OSError, match=rf"No space left on device: cannot write {re.escape(metrics.path)}$"):
        metrics.write({"type": "train", "iter": 1, "loss": 1.0})


# A fresh process that trains the tiny model (DataLoader workers in its own process group, as a
# terminal's Ctrl-C reaches them all) until a signal stops it.
TRAINED_UNTIL_SIGNALLED = """
import json, sys
import torch, hrnetdet
torch.manual_seed(0)
model = hrnetdet.create_model("faster_rcnn_hrnetv2p_w18", num_classes=4, min_size=64, max_size=80, **json.loads(sys.argv[1]))
hrnetdet.fit(model, sys.argv[2], sys.argv[3], out_dir=sys.argv[4], **json.loads(sys.argv[5]))
"""


def _first_record(path, proc, timeout=600):
    """Waits until the run has logged its first training record."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if os.path.isfile(path) and '"train"' in open(path).read():
            return
        time.sleep(0.2)
    raise AssertionError(f"no training record in {path}: {proc.communicate()[1][-2000:]}")


def test_ctrl_c_and_sigterm_save_a_state_that_resumes_to_identical_weights(shapes, tmp_path):
    """Before: Ctrl-C (or a scheduler's SIGTERM) left no last/ and no training_state.pt."""
    (ann, images), _ = shapes
    kw = dict(iters=4, batch_size=1, lr=0.005, checkpoint_every=100, log_every=1, progress=False)
    fit(tiny_model("faster_rcnn_hrnetv2p_w18"), ann, images, out_dir=str(tmp_path / "straight"), **kw)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    for signum in (signal.SIGINT, signal.SIGTERM):
        run = tmp_path / signum.name
        proc = subprocess.Popen([sys.executable, "-c", TRAINED_UNTIL_SIGNALLED, json.dumps(RPN_SMALL), ann, images,
                                 str(run), json.dumps({**kw, "num_workers": 1})], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        _first_record(run / "metrics.jsonl", proc)
        os.killpg(proc.pid, signum)
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode != 0 and f"stopped by {signum.name} at iteration" in stderr, stderr[-2000:]
        saved = _recorded_iterations(run)
        assert saved[0] == saved[1] and 1 <= saved[0] < 4, saved
        resumed = fit(tiny_model("faster_rcnn_hrnetv2p_w18", seed=123), ann, images, out_dir=str(run), resume=True,
                      **kw)
        assert resumed["iterations"] == 4 and _same(_weights(tmp_path / "straight"), _weights(run)), signum.name
        assert [json.loads(line)["iter"] for line in open(run / "metrics.jsonl")] == [1, 2, 3, 4]


@pytest.mark.slow  # about 3 minutes on 2 cores: two runs that each write full checkpoints
def test_nonfinite_losses_are_skipped_and_reported(shapes, tmp_path):
    (ann, images), _ = shapes
    model = tiny_model("faster_rcnn_hrnetv2p_w18")
    forward, count = model.forward, [0]

    def nan_on_second(*args, **kwargs):
        count[0] += 1
        losses = forward(*args, **kwargs)
        if count[0] == 2:
            losses["loss_classifier"] = losses["loss_classifier"] * float("nan")
        return losses
    model.forward = nan_on_second
    summary = fit(model, ann, images, out_dir=str(tmp_path), iters=3, lr=0.005, progress=False, log_every=1)
    assert summary["skipped_steps"] == 1
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["iter"] for r in records if r["type"] == "skip"] == [2]
    assert all(torch.isfinite(p).all() for p in model.parameters())

    always = tiny_model("faster_rcnn_hrnetv2p_w18")
    always_forward = always.forward
    always.forward = lambda *a, **k: {k2: v * float("inf") for k2, v in always_forward(*a, **k).items()}
    with pytest.raises(FloatingPointError, match="2 consecutive non-finite losses"):
        fit(always, ann, images, out_dir=str(tmp_path / "inf"), iters=5, progress=False, max_nonfinite=2)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, port, ann, images, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    model = tiny_model("faster_rcnn_hrnetv2p_w18", seed=rank)  # different inits: DDP broadcasts rank 0's
    if rank == 0:
        torch.save(model.state_dict(), os.path.join(out, "init0.pt"))
    fit(model, ann, images, out_dir=os.path.join(out, "run"), iters=2, batch_size=1, lr=0.005, device="cpu",
        progress=False)
    torch.save(model.state_dict(), os.path.join(out, f"rank{rank}.pt"))


@pytest.mark.slow
def test_two_process_gloo_ddp_ends_with_identical_weights(shapes, tmp_path):
    (ann, images), _ = shapes
    mp.spawn(_ddp_worker, args=(_free_port(), ann, images, str(tmp_path)), nprocs=2)
    w0, w1, init = (torch.load(tmp_path / f, weights_only=True) for f in ("rank0.pt", "rank1.pt", "init0.pt"))
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    assert any(not torch.equal(w0[k], init[k]) for k in w0)
    state = torch.load(tmp_path / "run" / "training_state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and state["iteration"] == 2


@pytest.mark.slow
def test_cli_train_then_eval(shapes, tmp_path, capsys):
    (ann, images), (val_ann, val_images) = shapes
    run = str(tmp_path / "run")
    assert cli_main(["train", "--model", "faster_rcnn_hrnetv2p_w18", "--train-ann", ann, "--train-images", images,
                     "--val-ann", val_ann, "--val-images", val_images, "--out", run, "--iters", "2",
                     "--min-size", "64", "--max-size", "80", "--workers", "0", "--lr", "0.005"]) == 0
    for name in ("last/model.safetensors", "best/model.safetensors", "best/config.json", "training_state.pt",
                 "metrics.jsonl", "loss.png", "lr.png", "ap.png"):
        assert os.path.isfile(os.path.join(run, name)), name
    config = json.load(open(os.path.join(run, "best", "config.json")))
    assert config["categories"] == ["__background__", "circle", "square", "triangle"]
    capsys.readouterr()
    assert cli_main(["eval", "--model", "faster_rcnn_hrnetv2p_w18", "--checkpoint", os.path.join(run, "best", "model.safetensors"),
                     "--ann", val_ann, "--images", val_images, "--out", str(tmp_path / "eval"),
                     "--min-size", "64", "--max-size", "80", "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "bbox: AP=" in out and "triangle" in out
    assert os.path.isfile(tmp_path / "eval" / "predictions.json")


# family -> (architecture, learning rate from scratch; at 0.005 the R-CNN losses spike, 3x in one step)
FAMILIES = {"two-stage": ("faster_rcnn_hrnetv2p_w18", 0.002), "cascade": ("cascade_rcnn_hrnetv2p_w18", 0.002),
            "fcos": ("fcos_hrnetv2p_w18", 0.005)}


def _classification_loss(model, ann, images):
    """The objectness and classifier losses of ``model`` on the whole training set in one batch:
    train mode on a copy (batch-norm statistics untouched), proposals sampled under a fixed seed.
    (Box-regression losses first grow when training from scratch, as proposals start to overlap
    objects and more of them are sampled as positives.)"""
    imgs, targets = zip(*CocoDetection(ann, images))
    torch.manual_seed(0)
    with torch.no_grad():
        losses = copy.deepcopy(model).train()(list(imgs), list(targets))
    return sum(v.item() for k, v in losses.items() if "classif" in k or "objectness" in k)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_short_finetune_lowers_loss_and_evaluates(family, shapes, tmp_path):
    arch, lr = FAMILIES[family]
    (ann, images), (val_ann, val_images) = shapes
    model = tiny_model(arch, norm_eval=False)
    before = _classification_loss(model, ann, images)
    summary = fit(model, ann, images, val_ann, val_images, out_dir=str(tmp_path), iters=12, batch_size=2,
                  lr=lr, checkpoint_every=12, progress=False, log_every=1, aug="none")
    records = [r for r in map(json.loads, open(tmp_path / "metrics.jsonl")) if r["type"] == "train"]
    assert len(records) == 12
    # measured on the same images before and after: the per-step losses of a run from scratch swing
    # 3x between steps (each step samples other proposals) and compared windows of them by chance
    after = _classification_loss(model, ann, images)
    assert after < 0.8 * before, (before, after)
    metrics = hrnetdet.evaluate(model, val_ann, val_images, out_dir=str(tmp_path / "eval"), progress=False)
    assert set(metrics["bbox"]["stats"]) >= {"AP", "AP50", "AP75", "ARl"}
    assert summary["val"]["bbox_AP"] == pytest.approx(metrics["bbox"]["stats"]["AP"])
    results = json.load(open(tmp_path / "eval" / "predictions.json"))
    assert {r["category_id"] for r in results} <= {3, 7, 11}
    reloaded = tiny_model(arch, checkpoint_path=summary["best"])
    again = hrnetdet.evaluate(reloaded, val_ann, val_images, progress=False)
    assert again["bbox"]["stats"] == metrics["bbox"]["stats"]


def test_fcos_losses_reach_the_loss_curve(tmp_path):
    model = tiny_model("fcos_hrnetv2p_w18").train()
    target = {"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1])}
    losses = model([torch.rand(3, 64, 80)], [target])
    record = {"type": "train", "iter": 1, "lr": 0.01, "loss": sum(losses.values()).item(),
              **{k: v.item() for k, v in losses.items()}}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    assert plot_curves(str(tmp_path / "metrics.jsonl"), str(tmp_path)) == [str(tmp_path / "loss.png"),
                                                                           str(tmp_path / "lr.png")]
    assert loss_keys([record]) == ["loss", *sorted(losses)]


BAD_TARGETS = {  # (field changed, value) -> the field the error must name
    "label 0 (background)": ("labels", torch.tensor([0]), r"targets\[1\]\['labels'\]\[0\] is 0"),
    "label past the classes": ("labels", torch.tensor([4]), r"targets\[1\]\['labels'\]\[0\] is 4: .* 1\.\.3"),
    "no labels": ("labels", None, r"targets\[1\] has no 'labels'"),
    "inverted box": ("boxes", torch.tensor([[40.0, 8.0, 10.0, 30.0]]), r"targets\[1\]\['boxes'\]\[0\]"),
    "box outside the image": ("boxes", torch.tensor([[90.0, 8.0, 99.0, 30.0]]), r"targets\[1\]\['boxes'\]\[0\]"),
    "NaN box": ("boxes", torch.tensor([[float("nan"), 8.0, 20.0, 30.0]]), r"targets\[1\]\['boxes'\]\[0\]"),
    "mask of another size": ("masks", torch.ones(1, 32, 40, dtype=torch.uint8), r"targets\[1\]\['masks'\]"),
}


@pytest.mark.parametrize("family", [f.name for f in hrnetdet.list_families()])
def test_every_family_rejects_bad_targets_naming_image_and_field(family):
    model = tiny_model(f"{family}_hrnetv2p_w18").train()
    images = [torch.rand(3, 64, 80), torch.rand(3, 64, 80)]
    good = {"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1]),
            "masks": torch.zeros(1, 64, 80, dtype=torch.uint8)}
    for case, (key, value, message) in BAD_TARGETS.items():
        bad = dict(good)
        if value is None:
            del bad[key]
        else:
            bad[key] = value
        with pytest.raises(ValueError, match=message):
            model(images, [good, bad])


def test_default_checkpoint_and_log_intervals_suit_short_and_long_runs():
    def plan(per_epoch=100, **kw):
        return Plan.resolve(TrainConfig(**kw), per_epoch, 1, RCNN_RECIPE, "faster_rcnn_hrnetv2p_w18")
    for iters in (1, 5, 12, 40, 100, 1000, 90000):
        p = plan(iters=iters)
        validations = sum(1 for it in range(1, iters + 1) if it % p.checkpoint_every == 0 or it == iters)
        assert validations <= 10 and (p.checkpoint_every > 1 or iters == 1), (iters, p.checkpoint_every)
        assert iters // p.log_every >= min(iters, 50) and p.log_every <= 20, (iters, p.log_every)
    assert plan(iters=12).checkpoint_every == 10 and plan(iters=1000).checkpoint_every == 100
    assert plan(epochs=12).checkpoint_every == 200 and plan(epochs=5, per_epoch=1).checkpoint_every == 5
    assert plan(iters=12, checkpoint_every=3, log_every=4).checkpoint_every == 3


def test_ap_curve_is_scaled_to_its_values(tmp_path):
    records = [{"type": "val", "iter": i, "bbox_AP": ap, "bbox_AP50": 2 * ap} for i, ap in
               ((100, 0.004), (200, 0.011), (300, 0.019))]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    plot_curves(str(tmp_path / "metrics.jsonl"), str(tmp_path))
    pixels = np.asarray(Image.open(tmp_path / "ap.png").convert("RGB")).astype(int)
    blue = (abs(pixels - np.array([31, 119, 180])).sum(-1) < 40).any(1)  # matplotlib's C0: the bbox_AP line
    rows = np.flatnonzero(blue)
    assert rows.max() - rows.min() > 0.25 * pixels.shape[0]  # a 0-1 axis would squeeze it into a few pixels
    assert (tmp_path / "metrics.csv").read_text().splitlines()[0] == "type,iter,bbox_AP,bbox_AP50"


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    body = HRNet(18).train()
    x = torch.rand(1, 3, 64, 96)
    grads = []
    for enable in (False, True):
        body.set_grad_checkpointing(enable)
        body.zero_grad()
        loss = sum(o.square().mean() for o in body(x))
        loss.backward()
        grads.append({k: p.grad.clone() for k, p in body.named_parameters()})
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-7, msg=k)


def test_ema_is_validated_and_saved_patience_stops_and_logs_reach_tensorboard(shapes, tmp_path):
    (ann, images), (val_ann, val_images) = shapes
    model = tiny_model("faster_rcnn_hrnetv2p_w18")
    steps = []
    hook = register_optimizer_step_post_hook(
        lambda *_: steps.append({k: v.detach().clone() for k, v in model.state_dict().items()}))
    try:
        summary = fit(model, ann, images, val_ann, val_images, out_dir=str(tmp_path / "ema"), iters=3, batch_size=1,
                      lr=0.005, ema=0.5, aug="none", checkpoint_every=3, log_every=1, progress=False)
    finally:
        hook.remove()
    # The EMA of the weights after each step, its decay ramped as min(decay, (1 + n) / (10 + n)).
    ema = dict(steps[0])
    for n, weights in enumerate(steps[1:], start=1):
        decay = min(0.5, (1 + n) / (10 + n))
        ema = {k: torch.lerp(v, weights[k], 1 - decay) if v.is_floating_point() else weights[k] for k, v in ema.items()}
    saved = load_file(os.path.join(tmp_path / "ema", "last", "model.safetensors"))
    assert len(steps) == 3 and not torch.equal(ema["roi_heads.box_predictor.cls_score.weight"],
                                               steps[-1]["roi_heads.box_predictor.cls_score.weight"])
    for k, v in ema.items():
        torch.testing.assert_close(saved[k], v, rtol=1e-6, atol=1e-7, msg=k)
    assert load_file(summary["best"]).keys() == saved.keys()
    reloaded = tiny_model("faster_rcnn_hrnetv2p_w18", checkpoint_path=summary["last"])
    metrics = hrnetdet.evaluate(reloaded, val_ann, val_images, progress=False)
    assert summary["val"]["bbox_AP"] == pytest.approx(metrics["bbox"]["stats"]["AP"])

    records = [json.loads(line) for line in open(tmp_path / "ema" / "metrics.jsonl")]
    if importlib.util.find_spec("tensorboard") is not None:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        events = EventAccumulator(str(tmp_path / "ema" / "tensorboard"))
        events.Reload()
        assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
        assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(
            [r["loss"] for r in records if r["type"] == "train"])
        assert [e.value for e in events.Scalars("val/bbox_AP")] == pytest.approx([summary["val"]["bbox_AP"]])

    # A learning rate of 0 never improves on the first validation: the third one stops the run.
    stopped = fit(tiny_model("faster_rcnn_hrnetv2p_w18"), ann, images, val_ann, val_images,
                  out_dir=str(tmp_path / "patience"), iters=20, batch_size=1, lr=0.0, checkpoint_every=1,
                  patience=2, progress=False)
    assert stopped["stopped_early"] and stopped["iterations"] == 3
    val_iters = [r["iter"] for r in map(json.loads, open(tmp_path / "patience" / "metrics.jsonl")) if r["type"] == "val"]
    assert val_iters == [1, 2, 3]
