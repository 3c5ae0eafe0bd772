"""fit's callbacks: a user callback sees every event in order at the right iterations, can stop a run
that then resumes to the weights of a straight one, and its errors name it; the example runs."""
import csv
import importlib.util
import json
import math
import os

import pytest
import torch

from hrnetdet import fit
from hrnetdet.engine import Callback, CallbackError
from test_train import _recorded_iterations, _same, _weights, shapes, tiny_model  # noqa: F401 (shapes: a fixture)

ARCH = "faster_rcnn_hrnetv2p_w18"
EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "custom_callback.py")


class Recorder(Callback):
    """Records (event, iteration[, detail]) and checks what each event promises."""

    def __init__(self):
        self.events = []
        self.plan = None

    def on_fit_start(self, state):
        self.plan = state.run.plan
        self.events.append(("fit_start", state.iteration))

    def on_epoch_start(self, state):
        self.events.append(("epoch_start", state.iteration, state.epoch))

    def on_step_skipped(self, state, losses):
        self.events.append(("step_skipped", state.iteration))

    def on_step_end(self, state, losses):
        assert "loss" in losses and all(isinstance(v, float) for v in losses.values())
        assert state.step_skipped == (not all(map(math.isfinite, losses.values())))
        self.events.append(("step_end", state.iteration))

    def on_validation_end(self, state, metrics):
        assert metrics == state.last_val and "bbox_AP" in metrics
        self.events.append(("validation_end", state.iteration))

    def on_checkpoint(self, state, path):
        # last/ and the training state are on disk, at this iteration
        assert json.load(open(os.path.join(path, "config.json")))["iteration"] == state.iteration
        assert torch.load(os.path.join(state.run.out_dir, "training_state.pt"),
                          weights_only=True)["iteration"] == state.iteration
        self.events.append(("checkpoint", state.iteration))

    def on_fit_end(self, state):
        self.events.append(("fit_end", state.iteration))


def expected_events(plan, start=0, validation=True):
    """The events of a run from ``start`` to the end of ``plan``, as the docs order them."""
    events = [("fit_start", start)]
    for it in range(start + 1, plan.total + 1):
        if it == start + 1 or (it - 1) % plan.per_epoch == 0:
            events.append(("epoch_start", it - 1, (it - 1) // plan.per_epoch))
        events.append(("step_end", it))
        if it % plan.checkpoint_every == 0 or it == plan.total:
            events += [("validation_end", it)] * validation + [("checkpoint", it)]
    return events + [("fit_end", plan.total)]


def test_a_user_callback_sees_every_event_in_order_at_its_iteration(shapes, tmp_path):
    (ann, images), (val_ann, val_images) = shapes
    recorder = Recorder()
    summary = fit(tiny_model(ARCH), ann, images, val_ann, val_images, out_dir=str(tmp_path), iters=4, batch_size=2,
                  lr=0.005, checkpoint_every=2, log_every=1, progress=False, aug="none", callbacks=[recorder])
    plan = recorder.plan
    assert (plan.total, plan.per_epoch, plan.checkpoint_every) == (4, 2, 2)  # two epochs, two checkpoints
    assert recorder.events == expected_events(plan) == [
        ("fit_start", 0), ("epoch_start", 0, 0), ("step_end", 1), ("step_end", 2), ("validation_end", 2),
        ("checkpoint", 2), ("epoch_start", 2, 1), ("step_end", 3), ("step_end", 4), ("validation_end", 4),
        ("checkpoint", 4), ("fit_end", 4)]
    assert sum(e[0] == "step_end" for e in recorder.events) == plan.total == summary["iterations"]
    assert summary["stop_reason"] is None

    # A finished run resumed: no step, the loop's start and end only.
    again = Recorder()
    fit(tiny_model(ARCH), ann, images, val_ann, val_images, out_dir=str(tmp_path), iters=4, batch_size=2,
        lr=0.005, checkpoint_every=2, progress=False, aug="none", resume=True, callbacks=[again])
    assert again.events == [("fit_start", 4), ("fit_end", 4)]


class StopAt(Callback):
    def __init__(self, iteration):
        self.iteration = iteration

    def on_step_end(self, state, losses):
        if state.iteration == self.iteration:
            state.request_stop(f"asked at {state.iteration}")


def test_a_callback_stops_the_run_saved_at_its_iteration_and_resume_continues(shapes, tmp_path):
    (ann, images), _ = shapes
    kw = dict(iters=4, batch_size=1, lr=0.005, checkpoint_every=100, log_every=1, progress=False)
    fit(tiny_model(ARCH), ann, images, out_dir=str(tmp_path / "straight"), **kw)

    run = tmp_path / "stopped"
    recorder = Recorder()
    stopped = fit(tiny_model(ARCH), ann, images, out_dir=str(run), callbacks=[StopAt(2), recorder], **kw)
    assert stopped["iterations"] == 2 and stopped["stop_reason"] == "asked at 2" and not stopped["stopped_early"]
    assert _recorded_iterations(run) == (2, 2)
    assert recorder.events[-2:] == [("checkpoint", 2), ("fit_end", 2)]  # saved at once, not at the plan's 4

    resumed_recorder = Recorder()
    resumed = fit(tiny_model(ARCH, seed=123), ann, images, out_dir=str(run), resume=True,
                  callbacks=[resumed_recorder], **kw)
    assert resumed["iterations"] == 4 and resumed["stop_reason"] is None
    assert resumed_recorder.events == expected_events(resumed_recorder.plan, start=2, validation=False)
    assert _same(_weights(tmp_path / "straight"), _weights(run))
    assert [json.loads(line)["iter"] for line in open(run / "metrics.jsonl")] == [1, 2, 3, 4]


def test_a_skipped_step_is_announced_before_its_step_end(shapes, tmp_path):
    (ann, images), _ = shapes
    model = tiny_model(ARCH)
    forward, calls = model.forward, [0]

    def nan_on_second(*args, **kwargs):
        calls[0] += 1
        losses = forward(*args, **kwargs)
        return {k: v * float("nan") for k, v in losses.items()} if calls[0] == 2 else losses
    model.forward = nan_on_second
    recorder = Recorder()
    summary = fit(model, ann, images, out_dir=str(tmp_path), iters=2, batch_size=1, lr=0.005, progress=False,
                  callbacks=[recorder])
    assert summary["skipped_steps"] == 1
    assert recorder.events[2:6] == [("step_end", 1), ("step_skipped", 2), ("step_end", 2), ("checkpoint", 2)]


class Broken(Callback):
    def __init__(self):
        self.ended = False

    def on_step_end(self, state, losses):
        raise ValueError("boom\nsecond line")

    def on_fit_end(self, state):
        self.ended = True


def test_a_callback_error_propagates_naming_the_callback_event_and_iteration(shapes, tmp_path):
    (ann, images), _ = shapes
    broken = Broken()
    with pytest.raises(CallbackError, match=r"^callback Broken\.on_step_end failed at iteration 1: ValueError: boom$") \
            as failure:
        fit(tiny_model(ARCH), ann, images, out_dir=str(tmp_path), iters=3, batch_size=1, progress=False,
            callbacks=[broken])
    assert isinstance(failure.value.__cause__, ValueError) and broken.ended  # on_fit_end ran: files closed
    assert not os.path.exists(tmp_path / "training_state.pt")
    with pytest.raises(TypeError, match="callbacks must be hrnetdet.engine.Callback instances, got function"):
        fit(tiny_model(ARCH), ann, images, out_dir=str(tmp_path), iters=1, callbacks=[lambda state: None])


def test_the_custom_callback_example_logs_to_csv_and_stops(shapes, tmp_path):
    (ann, images), (val_ann, val_images) = shapes
    spec = importlib.util.spec_from_file_location("custom_callback", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = str(tmp_path / "run")
    argv = ["--train-ann", ann, "--train-images", images, "--val-ann", val_ann, "--val-images", val_images,
            "--out", out, "--iters", "3", "--batch-size", "1", "--lr", "0.005", "--min-size", "64",
            "--max-size", "80", "--stop-below", "1e9"]  # every loss is below: stops after the first step
    summary = example.main(argv)
    assert summary["iterations"] == 1 and summary["stop_reason"].endswith("< 1000000000.0")
    summary = example.main(argv[:-2])  # the same command without the stop resumes and finishes
    assert summary["iterations"] == 3
    rows = list(csv.DictReader(open(os.path.join(out, "steps.csv"))))
    assert [(r["iteration"], bool(r["loss"]), bool(r["bbox_AP"])) for r in rows] == [
        ("1", True, False), ("2", True, False), ("3", True, False), ("3", False, True)]
    assert rows[0]["epoch"] == "0" and float(rows[0]["lr"]) > 0
