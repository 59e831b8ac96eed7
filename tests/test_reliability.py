"""Faults with real processes: a finetune killed with SIGKILL resumes to the same weights."""

import os
import signal
import subprocess
import sys
import time

import yaml

from nni_2ndmatch import load_pruned, prune_diffusers, save_pruned
from nni_2ndmatch.io import load_tensors
from nni_2ndmatch.models import build_builtin
from nni_2ndmatch.pruning import default_example_inputs

STEPS = 8


def _config(tmp_path, name, student_dir):
    raw = {"version": 1, "model": {"teacher": {"builtin": "tiny-unet"}, "student": {"path": str(student_dir)}},
           "data": {"builtin": "digits", "resolution": 16},
           "finetune": {"finetuner": "2ndmatch", "steps": STEPS, "batch_size": 4, "checkpoint_every": 1,
                        "log_every": 1, "seed": 3},
           "output_dir": str(tmp_path / name)}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _command(*args):
    return [sys.executable, "-m", "nni_2ndmatch.cli", *map(str, args), "--no-progress"]


def _latest_step(out):
    pointer = out / "checkpoints" / "latest"
    return int(pointer.read_text().strip().split("-")[-1]) if pointer.is_file() else 0


def test_sigkill_at_any_moment_then_resume_ends_with_the_weights_of_an_uninterrupted_run(tmp_path):
    teacher = build_builtin("tiny-unet")
    student, _ = prune_diffusers(teacher, "magnitude", 0.3, example_inputs=default_example_inputs(teacher))
    save_pruned(student, tmp_path / "student")
    reference = _config(tmp_path, "reference", tmp_path / "student")
    assert subprocess.run(_command("finetune", reference), capture_output=True, timeout=600).returncode == 0

    config = _config(tmp_path, "killed", tmp_path / "student")
    out = tmp_path / "killed"
    kills = 0
    for wait_until_step in (2, 5):  # two kills, each at an arbitrary moment after a checkpoint
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
    done = subprocess.run(_command("finetune", config, "--resume"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    want = load_pruned(tmp_path / "reference" / "student").state_dict()
    got = load_pruned(out / "student").state_dict()
    assert want.keys() == got.keys() and all((want[k] == got[k]).all() for k in want)  # bit-exact on CPU
