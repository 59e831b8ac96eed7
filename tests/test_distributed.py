"""Multi-process finetuning with real processes on the CPU (gloo), started by real launchers."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers.cli import cli_here
from helpers.tiny_models import tiny_unet2d

from nni_2ndmatch.files import load_tensors
from nni_2ndmatch.training import Watch

HERE = Path(__file__).resolve().parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.slow  # subprocesses and launchers


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def torchrun(n, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port", free_port(),
            *args]


def accelerate_launch(n, *args):
    # --multi_gpu picks accelerate's torchrun-based launcher; without GPUs each process runs on the CPU (gloo)
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
            "--main_process_port", free_port(), *args]


def run_worker(tmp_path, name, processes, runs):
    """Each of ``runs`` (name -> spec) in turn in ``processes`` worker processes: name -> final weights."""
    specs = [{"steps": 3, "batch_size": 8, "result": str(tmp_path / f"{run}.safetensors"), **spec}
             for run, spec in runs.items()]
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(specs))
    worker = [str(HERE / "ddp_worker.py"), str(path)]
    command = torchrun(processes, *worker) if processes > 1 else [sys.executable, *worker]
    r = subprocess.run(command, capture_output=True, text=True, timeout=600, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    return {run: load_tensors(spec["result"]) for run, spec in zip(runs, specs) if not spec.get("main_only_output_dir")}


def assert_same_weights(a, b, atol):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, worst


FINETUNERS = {"kd": ("kd", {}), "vjp": ("2ndmatch", {"mode": "vjp", "lambda_jac": 1.0}),
              "fd": ("2ndmatch", {"mode": "fd", "lambda_jac": 1.0})}


@pytest.fixture(scope="module")
def split_runs(tmp_path_factory):
    """For each finetuner: one process of batch 2b, one with 2 accumulation steps of b, and two processes
    of b (one launch for all of those, one for the single-process runs: start-up costs more than the runs).
    The Jacobian directions are a fixed function of each sample here (they are drawn per process
    otherwise), so all three see the same numbers."""
    tmp = tmp_path_factory.mktemp("split")

    def specs(kind, **extra):
        return {f"{kind}-{key}": {"finetuner": finetuner, "options": options, "fixed_directions": True, **extra}
                for key, (finetuner, options) in FINETUNERS.items()}

    single = run_worker(tmp, "single", 1, {**specs("single"), **specs("accum", gradient_accumulation_steps=2)})
    refused = {"refused": {"finetuner": "kd", "output_dir": str(tmp / "refused-run"), "main_only_output_dir": True}}
    ddp = run_worker(tmp, "ddp", 2, {**{key: {**spec, "output_dir": str(tmp / f"{key}-run")}
                                        for key, spec in specs("ddp").items()}, **refused})
    return tmp, {**single, **ddp}


@pytest.mark.parametrize("key", list(FINETUNERS))
def test_two_processes_of_batch_b_give_the_weights_of_one_process_of_batch_2b(split_runs, key):
    """Also one process with 2 accumulation steps of b."""
    tmp, weights = split_runs
    single, ddp, accumulated = (weights[f"{kind}-{key}"] for kind in ("single", "ddp", "accum"))
    start = tiny_unet2d(seed=1).state_dict()  # the worker's student before finetuning
    assert max((single[k] - start[k]).abs().max().item() for k in single) > 1e-4  # the weights moved
    assert_same_weights(single, ddp, atol=2e-5)
    assert_same_weights(single, accumulated, atol=2e-5)
    # only the main process wrote: checkpoints and metrics
    assert json.loads((tmp / f"ddp-{key}.safetensors.writes-1.json").read_text()) == []
    assert any("checkpoints" in w for w in json.loads((tmp / f"ddp-{key}.safetensors.writes-0.json").read_text()))


def test_a_finetune_whose_processes_are_given_different_runs_is_refused_by_every_one(split_runs):
    """Only the main process is given output_dir: it would checkpoint (a collective) where the
    other process does not; refused by both, before anything is written, not a hang."""
    tmp, weights = split_runs
    assert "refused" not in weights and not (tmp / "refused-run").exists()
    for rank in (0, 1):
        error = (tmp / f"refused.safetensors.error-{rank}.txt").read_text()
        assert "every process must be given the same config" in error and f"rank {rank}: output_dir=" in error


def _config(tmp_path, name, steps, **finetune):
    raw = {"version": 1, "model": {"teacher": {"builtin": "tiny-unet"}},
           "data": {"builtin": "digits", "resolution": 16},
           "pruning": {"pruner": "magnitude", "sparse_ratio": 0.3},
           "finetune": {"finetuner": "kd", "steps": steps, "batch_size": 8, "checkpoint_every": 2, "log_every": 1,
                        "ema_decay": None, "seed": 1, **finetune},
           "output_dir": str(tmp_path / name)}
    path = tmp_path / f"{name}-{steps}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_the_cli_under_accelerate_launch_resumes_with_another_number_of_processes(tmp_path):
    """2 processes for 2 steps, then 1 process resumes to 4: the weights of 1 process for 4 steps (the
    single-process runs in this process)."""
    ref = cli_here("run", _config(tmp_path, "ref", 4), "--no-progress")
    assert ref.returncode == 0, ref.stderr[-3000:]
    first = subprocess.run(accelerate_launch(2, "-m", "nni_2ndmatch.cli", "run", _config(tmp_path, "split", 2),
                                             "--no-progress"), capture_output=True, text=True, timeout=600, env=ENV)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count('"finetuner": "kd"') == 1  # one summary, from the main process
    assert json.loads((tmp_path / "split" / "summary.json").read_text())["processes"] == 2
    second = cli_here("finetune", _config(tmp_path, "split", 4), "--resume", "--no-progress")
    assert second.returncode == 0, second.stderr[-3000:]
    a = load_tensors(next((tmp_path / "ref" / "student").glob("*.safetensors")))
    b = load_tensors(next((tmp_path / "split" / "student").glob("*.safetensors")))
    assert_same_weights(a, b, atol=2e-5)


def test_a_killed_process_makes_the_run_fail_loudly_not_hang(tmp_path):
    # 2ndmatch on half the batch: two student passes per step through DistributedDataParallel
    config = _config(tmp_path, "killed", 10_000, finetuner="2ndmatch", jac_fraction=0.5)
    proc = subprocess.Popen(torchrun(2, "-m", "nni_2ndmatch.cli", "run", config, "--no-progress"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV,
                            text=True)
    deadline = time.time() + 300
    checkpoints = tmp_path / "killed" / "checkpoints"
    while not checkpoints.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                               text=True).stdout.split()]
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)
    began = time.time()
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0 and time.time() - began < 120
    assert "SIGKILL" in stderr or "Signal 9" in stderr, stderr[-3000:]


def test_a_check_only_the_main_process_makes_stops_every_process_with_one_error_line(tmp_path):
    """The main process alone checks the output folder; the other process must stop with it, quietly
    (it used to die in the barrier with a traceback, or wait there until the launcher killed it)."""
    config = _config(tmp_path, "taken", 2)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "summary.json").write_text("{}")  # an earlier run's
    r = subprocess.run(torchrun(2, "-m", "nni_2ndmatch.cli", "run", config, "--no-progress"), capture_output=True,
                       text=True, timeout=600, env=ENV)
    assert r.returncode != 0  # (torchrun itself exits 1 when a process fails)
    assert r.stderr.count("error: output_dir") == 1 and "already holds a run" in r.stderr, r.stderr[-3000:]
    assert "[rank" not in r.stderr, r.stderr[-3000:]  # no process's traceback
    # the first to exit had the error's code (torchrun stops the other, which may be exiting by then)
    assert "exitcode  : 2" in r.stderr.split("Root Cause")[1], r.stderr[-3000:]


def test_a_validation_that_fails_in_the_main_process_stops_the_others_in_step(tmp_path):
    """The main process alone draws the validation grid; when that fails (here: the grid's file is a
    folder), the other process must stop with it, not run into the next step's collective."""
    config = _config(tmp_path, "grid", 4, validation_every=1, validation_images=2)
    (tmp_path / "grid" / "samples" / "step-000001.png").mkdir(parents=True)
    r = subprocess.run(torchrun(2, "-m", "nni_2ndmatch.cli", "run", config, "--no-progress"), capture_output=True,
                       text=True, timeout=600, env=ENV)
    assert r.returncode != 0 and "IsADirectoryError" in r.stderr, r.stderr[-3000:]
    assert "[rank1]" not in r.stderr, r.stderr[-3000:]  # quiet: no traceback of its own
    assert not (tmp_path / "grid" / "checkpoints" / "latest").exists()


def test_the_other_processes_exit_with_the_main_processs_code_and_print_nothing(monkeypatch, tmp_path, capsys):
    from helpers.cli import write_config

    from nni_2ndmatch import cli
    from nni_2ndmatch.errors import MainProcessFailed
    from nni_2ndmatch.job import run

    def failed(*args, **kwargs):
        raise MainProcessFailed(2)

    monkeypatch.setattr(run, "run_job", failed)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert cli.main(["run", str(write_config(tmp_path, lambda raw: None))]) == 2
    assert capsys.readouterr().err == ""


def test_only_the_main_process_loads_the_evaluation_models_to_check_them(monkeypatch, tmp_path):
    """It alone evaluates; each process loading CLIP (or the FID network) would cost N times the memory."""
    from helpers.cli import write_config

    from nni_2ndmatch import Runtime
    from nni_2ndmatch.config import load_config
    from nni_2ndmatch.job import inputs

    checked = []
    monkeypatch.setattr(inputs, "check_evaluate", lambda config, teacher, parts: checked.append(config))
    config = load_config(write_config(tmp_path, lambda raw: raw.update(evaluate={"samples": 8})))

    class Second(Runtime):
        rank, world_size = 1, 2

    inputs.check_inputs(config, False, Second())
    assert checked == []
    inputs.check_inputs(config, False, Runtime())
    assert len(checked) == 1


def test_jvp_mode_is_refused_with_several_processes():
    from nni_2ndmatch import Runtime, TrainConfig, finetune, get_finetuner
    from nni_2ndmatch.data import DigitsDataset

    class Two(Runtime):  # what a launcher's two processes see, refused before any collective call
        world_size = 2

    with pytest.raises(ValueError, match="mode='jvp' is not allowed with several processes"):
        finetune(tiny_unet2d(), tiny_unet2d(), get_finetuner("2ndmatch", mode="jvp"), DigitsDataset(8),
                 TrainConfig(steps=1, batch_size=8), runtime=Two(), watch=Watch(progress=False))


def test_batch_size_must_split_evenly():
    from nni_2ndmatch import Runtime, TrainConfig, finetune, get_finetuner
    from nni_2ndmatch.data import DigitsDataset

    class Two(Runtime):
        world_size = 2

    with pytest.raises(ValueError, match=r"batch_size=6 is not allowed: it must be a multiple of the number of "
                                         r"processes \(2\) x gradient_accumulation_steps \(2\)"):
        finetune(tiny_unet2d(), tiny_unet2d(), get_finetuner("dsm"), DigitsDataset(8),
                 TrainConfig(steps=1, batch_size=6, gradient_accumulation_steps=2), runtime=Two(),
                 watch=Watch(progress=False))


@pytest.mark.parametrize("var, value, expected", [
    ("ACCELERATE_MIXED_PRECISION", "bf16", "mixed_precision='bf16' is not used; set finetune.mixed_precision"),
    ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4",
     "gradient_accumulation_steps='4' is not used; set finetune.gradient_accumulation_steps"),
    ("ACCELERATE_DYNAMO_BACKEND", "INDUCTOR", "dynamo_backend='INDUCTOR' is not used; launch without it"),
])
@pytest.mark.parametrize("world", ["2", "1"])  # accelerate launch --num_processes 1 sets them too: not ignored
def test_accelerate_settings_that_bypass_the_config_are_refused(monkeypatch, var, value, expected, world):
    from nni_2ndmatch.errors import UserError
    from nni_2ndmatch.job.inputs import make_runtime

    monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setenv(var, value)
    with pytest.raises(UserError, match=expected):
        make_runtime("cpu", 60)


def test_under_a_launcher_an_indexed_device_is_refused_and_workers_share_the_cpus(monkeypatch):
    import torch

    from nni_2ndmatch.data import auto_workers
    from nni_2ndmatch.errors import UserError
    from nni_2ndmatch.job import inputs

    monkeypatch.setattr(inputs, "check_device", lambda device: None)  # as on a machine with two GPUs
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match=r"finetune.device: value 'cuda:1' is not allowed with several processes "
                                        r"\(each takes the GPU of its local rank\); allowed: cuda"):
        inputs.make_runtime("cuda:1", 60)
    decoding = type("Folder", (torch.utils.data.Dataset,), {"decodes": True})()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert auto_workers(decoding) == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 8 processes on this machine: 1 worker each, not 8
    assert auto_workers(decoding) == 1


def test_an_interrupted_multi_process_run_prints_one_hint_naming_the_launcher(monkeypatch, tmp_path, capsys):
    from helpers.cli import write_config

    from nni_2ndmatch import cli
    from nni_2ndmatch.job import run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "run_job", interrupted)
    config = write_config(tmp_path, lambda raw: None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert cli.main(["run", str(config)]) == 130
    assert capsys.readouterr().err == ""  # the other processes stay quiet
    monkeypatch.setenv("RANK", "0")
    assert cli.main(["run", str(config)]) == 130
    err = capsys.readouterr().err
    assert err.count("interrupted.") == 1 and "under the same launcher" in err


def test_each_process_encodes_its_share_of_the_cache_and_no_process_all_of_it(tmp_path):
    pytest.importorskip("transformers")
    from helpers.tiny_models import captioned_images, tiny_sd_pipeline
    from safetensors import safe_open

    raw = {"version": 1, "model": {"teacher": {"path": str(tiny_sd_pipeline(tmp_path / "sd"))}},
           "data": {"path": str(captioned_images(tmp_path / "images")), "resolution": 8},
           "pruning": {"pruner": "magnitude", "sparse_ratio": 0.3, "round_to": None},
           "finetune": {"finetuner": "kd", "steps": 2, "batch_size": 4}, "output_dir": str(tmp_path / "run")}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    script = tmp_path / "small_shards.py"  # 2 latents or 1 caption a shard: 4 + 4 shards
    script.write_text("import sys\nfrom nni_2ndmatch.data import encoded\nencoded.SHARD_BYTES = 256\n"
                      "if __name__ == '__main__':  # data loader workers start as fresh interpreters\n"
                      "    from nni_2ndmatch.cli import main\n    sys.exit(main(sys.argv[1:]))\n")
    r = subprocess.run(torchrun(2, str(script), "run", str(tmp_path / "cfg.yaml"), "--no-progress"),
                       capture_output=True, text=True, timeout=600, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    writers = {}
    for path in sorted((tmp_path / "run" / "cache").glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            writers[path.name] = f.metadata()["process"]
    jobs = [f"latents-0000{k}.safetensors" for k in range(4)] + [f"captions-0000{k}.safetensors" for k in range(4)]
    assert writers == {name: str(n % 2) for n, name in enumerate(jobs)}  # shard n of all to process n mod 2
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["processes"] == 2
