"""Faults with real processes: a finetune killed with SIGKILL resumes to the same weights."""

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from helpers.cli import cli_here
from helpers.tiny_models import captioned_images

from nni_2ndmatch import load_pruned, prune_diffusers, save_pruned
from nni_2ndmatch.files import load_tensors
from nni_2ndmatch.models import build_builtin
from nni_2ndmatch.pruning import default_example_inputs

STEPS = 8

pytestmark = pytest.mark.slow  # subprocesses and launchers


def _config(tmp_path, name, student_dir, data=None, **finetune):
    raw = {"version": 1, "model": {"teacher": {"builtin": "tiny-unet"}, "student": {"path": str(student_dir)}},
           "data": data or {"builtin": "digits", "resolution": 16},
           "finetune": {"finetuner": "2ndmatch", "steps": STEPS, "batch_size": 4, "checkpoint_every": 1,
                        "log_every": 1, "seed": 3, **finetune},
           "output_dir": str(tmp_path / name)}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _command(*args):
    return [sys.executable, "-m", "nni_2ndmatch.cli", *map(str, args), "--no-progress"]


def _latest_step(out):
    pointer = out / "checkpoints" / "latest"
    return int(pointer.read_text().strip().split("-")[-1]) if pointer.is_file() else 0


@pytest.mark.parametrize("workers", [0, 2])
def test_sigkill_at_any_moment_then_resume_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, workers):
    """In the training process (the digits: killed twice, the second time in a resumed run), and with
    two data loader workers decoding an image folder (hflip on: the flips are drawn by the loop, the
    reads by the workers; killed once)."""
    teacher = build_builtin("tiny-unet")
    student, _ = prune_diffusers(teacher, "magnitude", 0.3, example_inputs=default_example_inputs(teacher))
    save_pruned(student, tmp_path / "student")
    data, finetune = None, {}
    if workers:
        data = {"path": str(captioned_images(tmp_path / "images", n=12, size=20)), "resolution": 16}
        finetune = {"num_workers": workers, "hflip": True}
    reference = _config(tmp_path, "reference", tmp_path / "student", data, **finetune)
    assert cli_here("finetune", reference, "--no-progress").returncode == 0  # the kills below need subprocesses

    config = _config(tmp_path, "killed", tmp_path / "student", data, **finetune)
    out = tmp_path / "killed"
    kills = 0
    for wait_until_step in ((2, 5) if not workers else (3,)):  # each at an arbitrary moment after a checkpoint
        resume = ["--resume"] if kills else []
        proc = subprocess.Popen(_command("finetune", config, *resume), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while _latest_step(out) < wait_until_step and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
        load_tensors(out / "checkpoints" / f"step-{_latest_step(out):07d}" / "state.safetensors")  # loadable
    done = cli_here("finetune", config, "--resume", "--no-progress")
    assert done.returncode == 0, done.stderr
    want = load_pruned(tmp_path / "reference" / "student").state_dict()
    got = load_pruned(out / "student").state_dict()
    assert want.keys() == got.keys() and all((want[k] == got[k]).all() for k in want)  # bit-exact on CPU


def _tree(root):
    return {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_too_little_disk_space_is_refused_before_training_with_an_estimate_that_fits_a_real_run(tmp_path, monkeypatch):
    import collections

    import pytest

    from nni_2ndmatch.config import load_config
    from nni_2ndmatch.errors import UserError
    from nni_2ndmatch.job.run import run_job

    teacher = build_builtin("tiny-unet")
    student, _ = prune_diffusers(teacher, "magnitude", 0.3, example_inputs=default_example_inputs(teacher))
    save_pruned(student, tmp_path / "student")
    config = load_config(_config(tmp_path, "run", tmp_path / "student"))
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr("nni_2ndmatch.job.finetune.shutil.disk_usage", lambda path: usage(10**9, 10**9 - 4096, 4096))
    with pytest.raises(UserError, match=r"output_dir .*: 0.0 MiB free on its disk, but this finetune needs about"
                                        r" [\d.]+ MiB") as refused:
        run_job(config, "finetune", progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()
    estimate = float(str(refused.value).split("needs about ")[1].split(" MiB")[0]) * 2**20

    monkeypatch.undo()
    run_job(config, "finetune", progress=False)
    written = sum(len(b) for b in _tree(tmp_path / "run").values())
    assert written <= estimate <= 2 * written  # an upper bound, not a wild one


def test_a_run_writes_only_under_its_output_folder_and_never_into_its_inputs(tmp_path):
    """Relative output_dir, run from another working folder: every new file is under output_dir."""
    teacher = build_builtin("tiny-unet")
    student, _ = prune_diffusers(teacher, "magnitude", 0.3, example_inputs=default_example_inputs(teacher))
    save_pruned(student, tmp_path / "student")
    config = _config(tmp_path, "ignored", tmp_path / "student")
    raw = yaml.safe_load(config.read_text())
    raw["output_dir"] = "../runs/../runs/mine"
    config.write_text(yaml.safe_dump(raw))
    work = tmp_path / "work"
    work.mkdir()
    before = _tree(tmp_path)
    r = subprocess.run(_command("finetune", config), cwd=work, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    after = _tree(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before  # inputs untouched
    new = set(after) - set(before)
    assert new and all(p.parts[:2] == ("runs", "mine") for p in new), sorted(map(str, new))
