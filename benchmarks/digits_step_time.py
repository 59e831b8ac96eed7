"""Seconds per step of each finetuner variant in the digits reference regime, measured idle.

The quality benchmark's ``seconds`` were taken beside other jobs; this times the same loop (the
shipped teacher pruned 0.3 by magnitude, batch 2, clip 1.0, Adam 2e-4, EMA 0.9983, dropout 0.1,
1 thread) for ``--steps`` steps per variant, in ``--rounds`` interleaved rounds, and reports the
median seconds per step (the first 20 steps of each run excluded) and the ratio to ``kd``.

    python benchmarks/digits_step_time.py [--steps 300] [--rounds 3] \
        [--out benchmarks/results/ablation/digits_step_time.json]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import options  # noqa: E402
from benchmarks.record import record  # noqa: E402
from nni_2ndmatch import TrainConfig, finetune, get_finetuner, prune_diffusers  # noqa: E402
from nni_2ndmatch.data import DigitsDataset  # noqa: E402
from nni_2ndmatch.files import write_results  # noqa: E402
from nni_2ndmatch.models.digits import RESOLUTION, load_digits_teacher  # noqa: E402
from nni_2ndmatch.training import Watch  # noqa: E402

BALANCED = {"lambda_jac": 0.1, "jac_reference_dims": 3072}
VARIANTS = {
    "dsm": ("dsm", {}),
    "kd": ("kd", {}),
    "2ndmatch (the paper's: norm, vjp)": ("2ndmatch", {**BALANCED, "mode": "vjp"}),
    "vector, noise weighting": ("2ndmatch", {"mode": "vjp", "jac_match": "vector", "jac_weighting": "noise",
                                             "lambda_jac": 1.0, "jac_reference_dims": 1}),
    "vector, x0 weighting": ("2ndmatch", {**BALANCED, "mode": "vjp", "jac_match": "vector", "jac_weighting": "x0"}),
    "log": ("2ndmatch", {"mode": "vjp", "jac_match": "log", "lambda_jac": 1.0}),
    "norm, t >= 50": ("2ndmatch", {"mode": "vjp", "lambda_jac": 1.0, "jac_min_timestep": 50}),
}
SKIP = 20


def seconds_per_step(student, teacher, data, kind: str, opts: dict, steps: int) -> float:
    times: list[float] = []
    config = TrainConfig(steps=steps, batch_size=2, lr=2e-4, ema_decay=0.9983, grad_clip=1.0, dropout=0.1,
                         log_every=1, checkpoint_every=10**9, seed=0)
    finetune(copy.deepcopy(student), teacher, get_finetuner(kind, **opts), data, config, watch=Watch(progress=False,
             on_log=lambda record: times.append(time.perf_counter())))
    return (times[-1] - times[SKIP - 1]) / (steps - SKIP)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--rounds", type=options.count(1), default=3)
    p.add_argument("--out", default="benchmarks/results/ablation/digits_step_time.json")
    args = p.parse_args(argv)
    if args.steps <= SKIP:
        p.error(f"--steps={args.steps} must exceed the {SKIP} untimed warm-up steps")
    return args


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    teacher = load_digits_teacher()
    student, _ = prune_diffusers(teacher, "magnitude", 0.3, round_to=None)
    data = DigitsDataset(RESOLUTION, "train")
    runs: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name, (kind, opts) in VARIANTS.items():
            runs[name].append(seconds_per_step(student, teacher, data, kind, opts, args.steps))
            print(f"{name}: {runs[name][-1] * 1e3:.1f} ms/step", flush=True)
    median = {name: statistics.median(v) for name, v in runs.items()}
    results = {**record(__file__),
               "platform": f"{platform.machine()}, torch {torch.__version__}, 1 thread",
               "variants": {name: {"finetuner": VARIANTS[name][0], "options": VARIANTS[name][1],
                                   "seconds_per_step": median[name], "runs": runs[name],
                                   "vs_kd": median[name] / median["kd"]} for name in VARIANTS}}
    lines = ["# Seconds per step in the digits reference regime (idle, 1 thread)", "",
             f"Command: `{results['command']}` ({results['platform']})", "",
             "| variant | ms/step (median) | vs kd |", "|---|---:|---:|"]
    lines += [f"| {name} | {median[name] * 1e3:.1f} | {median[name] / median['kd']:.2f}x |" for name in VARIANTS]
    write_results(Path(args.out), results, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main(parse_args())
