"""One process of a finetune, run by tests/test_distributed.py alone or under a launcher (torchrun).

    python tests/ddp_worker.py SPECS.json

SPECS: a list of runs made one after the other in this process (one start-up for several runs),
each with finetuner, options, steps, batch_size, gradient_accumulation_steps, output_dir, result
(where the main process saves the final weights), fixed_directions (replace the random Jacobian
directions by a function of each sample, so runs that split the batch differently see the same
ones), main_only_output_dir (the other processes are given no output_dir: the run must be refused
on every process, each writing its error to RESULT.error-RANK.txt). Every process records which
files it wrote through nni_2ndmatch.files, per run, in RESULT.writes-RANK.json.
"""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers.tiny_models import tiny_unet2d  # noqa: E402

import nni_2ndmatch.files as io_module  # noqa: E402
import nni_2ndmatch.finetuners as finetuners_module  # noqa: E402
import nni_2ndmatch.training.checkpoints as checkpoints_module  # noqa: E402
import nni_2ndmatch.training.loop as loop_module  # noqa: E402
from nni_2ndmatch import TrainConfig, finetune, get_finetuner  # noqa: E402
from nni_2ndmatch.data import DigitsDataset  # noqa: E402
from nni_2ndmatch.job.inputs import make_runtime  # noqa: E402
from nni_2ndmatch.training import Watch  # noqa: E402


def fixed_directions(like, generator=None):
    g = torch.sin(37.0 * like + 1.0)
    return g / g.flatten(1).norm(dim=1).view(-1, *([1] * (like.dim() - 1)))


def main(specs_path: str) -> None:
    specs = json.loads(Path(specs_path).read_text())
    torch.set_num_threads(1)
    writes = []
    for module in (io_module, loop_module, checkpoints_module):  # count the writes each process makes
        for name in ("atomic_write_json", "atomic_write_text", "save_tensors"):
            if hasattr(module, name):
                real = getattr(module, name)
                setattr(module, name, lambda *a, _real=real, **k: (writes.append(str(a[0])), _real(*a, **k))[1])
    runtime = make_runtime("cpu", 600)
    random_directions = finetuners_module.sample_directions
    for spec in specs:
        writes.clear()
        finetuners_module.sample_directions = fixed_directions if spec.get("fixed_directions") else random_directions
        teacher, student = tiny_unet2d(seed=0), tiny_unet2d(seed=1)
        config = TrainConfig(steps=spec["steps"], batch_size=spec["batch_size"], ema_decay=None, checkpoint_every=2,
                             gradient_accumulation_steps=spec.get("gradient_accumulation_steps", 1), seed=5)
        output_dir = spec.get("output_dir") if runtime.is_main or not spec.get("main_only_output_dir") else None
        out = Path(spec["result"])
        try:
            result = finetune(student, teacher, get_finetuner(spec["finetuner"], **spec.get("options", {})),
                              DigitsDataset(8), config, output_dir, runtime=runtime, watch=Watch(progress=False))
        except ValueError as e:
            if not spec.get("main_only_output_dir"):
                raise
            Path(f"{out}.error-{runtime.rank}.txt").write_text(str(e))
            continue
        Path(f"{out}.writes-{runtime.rank}.json").write_text(json.dumps(writes))
        if runtime.is_main:
            io_module.save_tensors(out, dict(result.student.state_dict()))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1])
