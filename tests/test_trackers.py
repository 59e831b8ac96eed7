"""finetune.report_to: the run's figures in TensorBoard (read back from its event files), a missing
tracker refused before any work, a tracker that fails mid-run reported once while training goes on."""

import json
import logging

import pytest
from helpers.cli import cli_here, write_config

from nni_2ndmatch.training import trackers as trackers_module


def _tensorboard(raw):
    raw["finetune"].update(report_to="tensorboard", steps=6, log_every=2, lambda_kd=0.5)


def _scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = [EventAccumulator(str(p.parent)).Reload() for p in folder.rglob("events.out.tfevents.*")]
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for acc in runs for tag in acc.Tags()["scalars"]}


@pytest.mark.slow  # runs of several steps: the full suite's
def test_a_run_sends_each_logged_step_to_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    result = cli_here("run", write_config(tmp_path, _tensorboard), "--no-progress")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "run"
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    scalars = _scalars(out / "logs")
    assert [s for s, _ in scalars["loss"]] == [2, 4, 6]
    for tag, key, weight in (("loss", "loss", 1.0), ("lr", "lr", 1.0), ("grad_norm", "grad_norm", 1.0),
                             ("loss/jac", "jac", 1.0), ("loss/kd", "kd", 0.5), ("loss/dsm", "dsm", 1.0)):
        assert [v for _, v in scalars[tag]] == pytest.approx([weight * m[key] for m in metrics], rel=1e-6), tag
    seconds = [(b["seconds"] - a["seconds"]) / 2 for a, b in zip(metrics, metrics[1:])]
    assert [v for _, v in scalars["seconds_per_step"]] == pytest.approx(seconds, rel=1e-5)
    assert [v for _, v in scalars["samples_per_second"]] == pytest.approx([4 / s for s in seconds], rel=1e-5)
    hparams = next((out / "logs").rglob("hparams.yml")).read_text()
    assert "finetune.jac_match: vector" in hparams and "finetune.report_to: tensorboard" in hparams


def test_a_tracker_that_is_not_installed_or_not_known_is_refused_before_any_work(tmp_path, monkeypatch):
    real = trackers_module.importlib.util.find_spec
    monkeypatch.setattr(trackers_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    for value, expected in (("wandb", "'wandb' needs the wandb package, which is not installed: pip install "
                                      "'nni-2ndmatch[wandb]'"),
                            (["tensorboard", "neptune"], "'neptune' is not a tracker; allowed: none, tensorboard"),
                            (["none", "tensorboard"], "'none' is not allowed in a list of trackers")):
        result = cli_here("run", write_config(tmp_path, lambda raw: raw["finetune"].update(report_to=value)))
        assert result.returncode == 2 and expected in result.stderr and "finetune.report_to" in result.stderr
        assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


@pytest.mark.slow  # runs of several steps: the full suite's
def test_a_tracker_failing_mid_run_is_reported_once_and_training_goes_on(tmp_path, monkeypatch, caplog):
    pytest.importorskip("tensorboard")
    from accelerate.tracking import TensorBoardTracker

    calls = []

    def full_disk(self, values, step=None, **kwargs):
        calls.append(step)
        raise OSError("No space left on device")

    monkeypatch.setattr(TensorBoardTracker, "log", full_disk)
    with caplog.at_level(logging.WARNING, logger="nni_2ndmatch.training.trackers"):
        result = cli_here("run", write_config(tmp_path, _tensorboard), "--no-progress")
    assert result.returncode == 0, result.stderr
    assert calls == [2]  # dropped after its first failure
    warnings = [r.getMessage() for r in caplog.records if "tracker tensorboard failed" in r.getMessage()]
    assert len(warnings) == 1 and "No space left on device" in warnings[0]
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 3


def _validation(raw):
    raw["finetune"].update(steps=5, checkpoint_every=2, log_every=1, validation_every=2,
                           validation_images=3, report_to="tensorboard")


@pytest.mark.slow
def test_validation_grids_of_the_ema_student_leave_training_as_it_was(tmp_path):
    pytest.importorskip("tensorboard")
    import torch
    from PIL import Image

    from nni_2ndmatch import load_pruned
    from nni_2ndmatch.data import DigitsDataset
    from nni_2ndmatch.job.evaluate import Evaluator
    from nni_2ndmatch.job.report import save_grid

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    with_grids = cli_here("run", write_config(tmp_path / "a", _validation), "--no-progress")
    assert with_grids.returncode == 0, with_grids.stderr
    out = tmp_path / "a" / "run"
    assert sorted(p.name for p in (out / "samples").iterdir()) == [
        "step-000002.png", "step-000004.png", "step-000005.png", "teacher.png", "validation.json"]
    # the last grid is the finetuned (EMA) student's samples from the evaluator's fixed noise
    student = load_pruned(out / "student")
    from nni_2ndmatch.models import build_builtin

    sampler = Evaluator(build_builtin("tiny-unet"), DigitsDataset(16), samples=3, ddim_steps=25, seed=0, digits=None)
    save_grid(sampler.sample(student), tmp_path / "expected.png", columns=3)
    got, want = (Image.open(p).convert("L") for p in (out / "samples" / "step-000005.png", tmp_path / "expected.png"))
    assert got.size == want.size and got.tobytes() == want.tobytes()
    # drawing the grids changed nothing in training
    plain = cli_here("run", write_config(tmp_path / "b", lambda raw: (_validation(raw), raw["finetune"].update(
        validation_every=0, report_to="none"), raw["finetune"].pop("validation_images"))), "--no-progress")
    assert plain.returncode == 0, plain.stderr
    other = load_pruned(tmp_path / "b" / "run" / "student")
    assert all(torch.equal(p, q) for p, q in zip(student.state_dict().values(), other.state_dict().values()))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = []
    for events in (out / "logs").rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events.parent)).Reload()
        if "samples/student" in acc.Tags()["images"]:
            steps += [e.step for e in acc.Images("samples/student")]
    assert sorted(steps) == [2, 4, 5]


@pytest.mark.slow
def test_a_resumed_run_continues_the_grid_series_without_duplicates(tmp_path):
    import os

    first = cli_here("run", write_config(tmp_path, lambda raw: (_validation(raw), raw["finetune"].update(
        steps=4, report_to="none"))), "--no-progress")
    assert first.returncode == 0, first.stderr
    samples = tmp_path / "run" / "samples"
    before = {p.name: os.stat(p).st_mtime_ns for p in samples.iterdir()}
    resumed = cli_here("run", write_config(tmp_path, lambda raw: (_validation(raw), raw["finetune"].update(
        steps=6, report_to="none"))), "--resume", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    after = {p.name: os.stat(p).st_mtime_ns for p in samples.iterdir()}
    assert sorted(after) == ["step-000002.png", "step-000004.png", "step-000006.png", "teacher.png",
                             "validation.json"]
    assert all(after[name] == stamp for name, stamp in before.items())  # nothing drawn twice
    from PIL import Image

    more = cli_here("run", write_config(tmp_path, lambda raw: (_validation(raw), raw["finetune"].update(
        steps=8, report_to="none", validation_images=5))), "--resume", "--no-progress")
    assert more.returncode == 0, more.stderr
    sizes = {name: Image.open(samples / name).size for name in ("teacher.png", "step-000006.png", "step-000008.png")}
    assert sizes["teacher.png"] == sizes["step-000008.png"] != sizes["step-000006.png"]  # 5 images now, not 3


def test_validation_options_nobody_would_use_are_refused(tmp_path):
    prompts = cli_here("run", write_config(tmp_path, lambda raw: raw["finetune"].update(
        validation_prompts=["a digit"])))
    assert prompts.returncode == 2 and "validation_prompts is given but validation_every is 0" in prompts.stderr
    not_text = cli_here("run", write_config(tmp_path, lambda raw: raw["finetune"].update(
        validation_prompts=["a digit"], validation_every=2)))
    assert not_text.returncode == 2 and "finetune.validation_prompts: value ['a digit'] is not allowed: the " \
        "teacher takes no text prompts" in not_text.stderr
    assert not (tmp_path / "run").exists()
