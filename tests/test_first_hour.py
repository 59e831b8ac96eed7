"""What a new user meets first: clear errors before anything is written, Ctrl-C, resume, threads."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from helpers.cli import cli, cli_here, write_config
from helpers.tiny_models import tiny_unet2d
from helpers.training import Images, run_tiny

from nni_2ndmatch import TrainConfig, __version__, finetune, get_finetuner
from nni_2ndmatch.config import validate_config
from nni_2ndmatch.training import Watch


@pytest.mark.slow
def test_version():
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"nni-2ndmatch {__version__}"


def _image_folder(tmp_path, bad: bool):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(8):
        Image.new("L", (16, 16), color=i * 20).save(images / f"{i}.png")
    (images / "notes.txt").write_text("not an image")  # left out: no image suffix
    if bad:
        (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return images


def _folder_config(tmp_path, images, **data):
    def edit(raw):
        raw["data"] = {"path": str(images), "resolution": 16, "channels": 1, **data}
        raw["finetune"].update(steps=2, batch_size=4)
    return write_config(tmp_path, edit)


@pytest.mark.slow
def test_a_corrupt_image_is_one_clear_error_before_anything_is_written(tmp_path):
    images = _image_folder(tmp_path, bad=True)
    r = cli_here("run", _folder_config(tmp_path, images), "--no-progress")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "1 bad image(s)" in r.stderr and "broken.png: it does not decode as an image" in r.stderr
    assert "skip_bad_images" in r.stderr
    assert not (tmp_path / "run").exists()  # checked before the output folder is made
    r = cli("run", _folder_config(tmp_path, images, skip_bad_images=True), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "left out" in r.stderr and "broken.png" in r.stderr


def test_a_missing_data_folder_or_a_file_as_output_dir(tmp_path):
    r = cli_here("run", _folder_config(tmp_path, tmp_path / "nowhere"), "--no-progress")
    assert r.returncode == 2 and "data.path: value" in r.stderr and "no such file or folder" in r.stderr
    assert not (tmp_path / "run").exists()
    (tmp_path / "file").write_text("x")
    cfg = write_config(tmp_path, lambda raw: raw.update(output_dir=str(tmp_path / "file")), name="f.yaml")
    r = cli_here("run", cfg, "--no-progress")
    assert r.returncode == 2 and "is a file, not a folder" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_ctrl_c_exits_130_without_a_traceback_and_the_run_resumes(tmp_path):
    cfg = write_config(tmp_path, lambda raw: raw["finetune"].update(steps=100000, checkpoint_every=2))
    latest = tmp_path / "run" / "checkpoints" / "latest"
    # SIGINT as a terminal delivers it (a shell without job control starts background jobs ignoring it)
    proc = subprocess.Popen([sys.executable, "-m", "nni_2ndmatch.cli", "run", str(cfg), "--no-progress", "--threads",
                             "1"],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while not latest.is_file() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert latest.is_file()
    proc.send_signal(signal.SIGINT)
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert f"nni-2ndmatch run {cfg} --resume --threads 1 --no-progress" in stderr  # the user's own flags kept
    done = int(latest.read_text().strip().split("-")[1])
    longer = write_config(tmp_path, lambda raw: raw["finetune"].update(steps=done + 2, checkpoint_every=2))
    r = cli_here("run", longer, "--resume", "--no-progress")
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_the_resolved_config_is_written_and_a_changed_resume_is_an_error(tmp_path):
    cfg = write_config(tmp_path)
    assert cli_here("run", cfg, "--no-progress").returncode == 0
    written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    given = validate_config(yaml.safe_load(cfg.read_text()))
    again = validate_config(written)  # the written config loads again, to the same settings
    assert again.finetune.finetuner_kwargs() == given.finetune.finetuner_kwargs()
    assert again.finetune.train_config() == given.finetune.train_config()
    assert (again.model, again.data, again.pruning) == (given.model, given.data, given.pruning)
    assert written["finetune"]["jac_min_timestep"] == 0  # the strategy's defaults are written too,
    assert written["finetune"]["grad_clip"] == 1.0  # the loop's too,
    assert written["finetune"]["jac_weighting"] == "noise" and written["finetune"]["lambda_jac"] == 1.0  # as given
    changed = write_config(tmp_path, lambda raw: raw["finetune"].update(lr=1e-3, lambda_jac=0.5, steps=5),
                           name="changed.yaml")
    r = cli_here("run", changed, "--resume", "--no-progress")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "finetune.lambda_jac (1.0 -> 0.5)" in r.stderr and "finetune.lr" in r.stderr
    assert "finetune.steps" not in r.stderr  # more steps is how a run is extended


def test_threads_from_the_config_and_the_command_line(tmp_path, monkeypatch):
    raw = yaml.safe_load(write_config(tmp_path).read_text())
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    expected = max(1, len(os.sched_getaffinity(0)) // 2)
    assert validate_config(raw).resolved_threads() == expected
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert validate_config(raw).resolved_threads() == 3
    assert validate_config({**raw, "threads": 2}).resolved_threads() == 2
    for bad in (0, "many"):
        with pytest.raises(ValueError, match="threads"):
            validate_config({**raw, "threads": bad})
    from nni_2ndmatch.job import run

    before, seen, prune = torch.get_num_threads(), [], run.run_prune
    monkeypatch.setattr(run, "run_prune", lambda *a, **k: seen.append(torch.get_num_threads()) or prune(*a, **k))
    run.run_job(validate_config({**raw, "threads": 1}), "prune", progress=False)
    assert seen == [1] and torch.get_num_threads() == before  # the job's threads, then the caller's again
    r = cli_here("prune", write_config(tmp_path, name="t.yaml"), "--threads", "0", "--overwrite")
    assert r.returncode == 2 and "--threads: value 0 is not allowed" in r.stderr


def test_the_python_finetune_refuses_a_folder_that_holds_a_run(tmp_path):
    run_tiny(tmp_path, 2)
    with pytest.raises(FileExistsError, match="already holds a run .*resume=True.*overwrite=True"):
        run_tiny(tmp_path, 2)
    metrics = tmp_path / "metrics.jsonl"
    assert len(metrics.read_text().splitlines()) == 2  # untouched
    student, teacher = tiny_unet2d(seed=1, width=0.5), tiny_unet2d(seed=2)
    finetune(student, teacher, get_finetuner("dsm"), Images(), TrainConfig(steps=1, batch_size=4, log_every=1),
             tmp_path, overwrite=True, watch=Watch(progress=False))
    assert len(metrics.read_text().splitlines()) == 1
    assert [p.name for p in (tmp_path / "checkpoints").glob("step-*")] == ["step-0000001"]


@pytest.mark.slow  # runs of several steps: the full suite's
def test_wall_time_is_carried_across_a_resume(tmp_path):
    part, _ = run_tiny(tmp_path, 4)
    state = json.loads((tmp_path / "checkpoints" / "step-0000004" / "state.json").read_text())
    assert state["seconds"] > 0
    resumed, _ = run_tiny(tmp_path, 6, resume=True)
    assert resumed.seconds > state["seconds"]
    assert [h["seconds"] for h in resumed.history] == sorted(h["seconds"] for h in resumed.history)
    assert resumed.history[4]["seconds"] > state["seconds"]


def test_overwrite_keeps_the_old_run_when_the_new_settings_are_refused(tmp_path):
    run_tiny(tmp_path, 2)
    student, teacher = tiny_unet2d(seed=1, width=0.5), tiny_unet2d(seed=2)
    bad = TrainConfig(steps=1, batch_size=3, gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="batch_size=3 is not allowed"):
        finetune(student, teacher, get_finetuner("dsm"), Images(), bad, tmp_path, overwrite=True,
                 watch=Watch(progress=False))
    assert (tmp_path / "metrics.jsonl").is_file() and (tmp_path / "checkpoints" / "latest").is_file()


def test_a_student_the_config_names_is_checked_before_output_dir_is_touched(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "summary.json").write_text("{}")

    def edit(raw):
        raw.pop("pruning")
        raw["model"]["student"] = {"path": str(tmp_path / "missing")}
    r = cli_here("run", write_config(tmp_path, edit), "--overwrite", "--no-progress")
    assert r.returncode == 2 and "model.student" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "summary.json"]  # nothing written or deleted
    r = cli_here("run", write_config(tmp_path, lambda raw: raw["finetune"].update(batch_size=5000), name="b.yaml"),
                 "--overwrite", "--no-progress")
    assert r.returncode == 2 and "batch_size=5000 is larger than the data set" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "summary.json"]


def test_resume_allows_what_keeps_the_weights_and_refuses_a_schedule_change(tmp_path):
    from nni_2ndmatch.errors import UserError
    from nni_2ndmatch.job.output import write_config as write_run_config

    raw = yaml.safe_load(write_config(tmp_path).read_text())
    (tmp_path / "run").mkdir()
    write_run_config(validate_config(raw), resume=False)
    same_weights = {**raw, "finetune": {**raw["finetune"], "gradient_accumulation_steps": 2, "steps": 9}}
    write_run_config(validate_config(same_weights), resume=True)  # accepted
    cosine = {**raw, "finetune": {**raw["finetune"], "lr_schedule": "cosine"}}
    write_run_config(validate_config(cosine), resume=False)
    with pytest.raises(UserError, match=r"finetune.steps \(3 -> 9\)"):
        write_run_config(validate_config({**cosine, "finetune": {**cosine["finetune"], "steps": 9}}), resume=True)


def test_a_strategy_with_undeclared_init_options_is_refused_at_registration():
    from nni_2ndmatch import Finetuner, register_finetuner

    class OldStyle(Finetuner):
        def __init__(self, *, alpha: float = 1.0, scheduler=None):
            super().__init__(scheduler=scheduler)

    with pytest.raises(TypeError, match="alpha are keyword arguments of __init__ but not fields of its Options"):
        register_finetuner("old-style")(OldStyle)


def test_overwrite_removes_the_old_runs_report_and_export_too(tmp_path):
    """A report or an ONNX export left from the replaced run would describe another model."""
    from nni_2ndmatch.job.output import RunFolder

    folder = RunFolder(tmp_path / "run")
    for path in (folder.report / "results.json", folder.onnx / "student.onnx", folder.summary, folder.cache / "a"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("old")
    folder.prepare("run", resume=False, overwrite=True, keep_pruned=False)
    assert sorted(p.name for p in folder.root.iterdir()) == ["cache"]  # the data cache is reused by its settings
