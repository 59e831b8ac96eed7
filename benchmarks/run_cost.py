"""Whole-run cost of each finetuning arm in the reference regime, relative to kd, measured idle.

    python benchmarks/run_cost.py --data digits,mnist --steps 600 --rounds 3 --threads 1 \
        --arms kd,kd-perturb,2ndmatch,2ndmatch-every2,2ndmatch-every4,2ndmatch-every8

For each data set's shipped teacher (pruned 0.3 by magnitude) every arm runs ``finetune`` for
``--steps`` steps (batch 2, clip 1.0, Adam 2e-4, EMA 0.9983, dropout 0.1; the 2ndmatch arms with
the variant's options, benchmarks/arms.py), in ``--rounds`` rounds, the arms interleaved within each
round; a run's cost is the wall time of the whole ``finetune`` call, and each arm's figure is the
median over rounds, also as a ratio to kd's. ``digits_quality.py --budget equal-compute`` reads
these ratios (``--cost``); run this on an idle machine, never beside another torch job.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import options  # noqa: E402
from benchmarks.arms import REFERENCE_LOOP, REFERENCE_RATIO, VARIANT, arm, load_teacher, parse_arms  # noqa: E402
from benchmarks.record import record  # noqa: E402
from nni_2ndmatch import TrainConfig, finetune, get_finetuner, prune_diffusers  # noqa: E402
from nni_2ndmatch.files import write_results  # noqa: E402
from nni_2ndmatch.finetuners import jac_every_refusal  # noqa: E402
from nni_2ndmatch.pruning import default_example_inputs  # noqa: E402
from nni_2ndmatch.training import Watch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DATA = ("digits", "mnist")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="digits,mnist", help="the teachers: digits, mnist (comma-separated)")
    p.add_argument("--arms", default="kd,kd-perturb,2ndmatch,2ndmatch-every2,2ndmatch-every4,2ndmatch-every8")
    p.add_argument("--steps", type=options.count(1), default=600)
    p.add_argument("--rounds", type=options.count(1), default=3)
    p.add_argument("--threads", type=options.count(1), default=1)
    p.add_argument("--teacher", type=options.model_folder,
                   help="a diffusers folder trained on --data (one data set) instead of the shipped teacher, e.g. a "
                        "flow-matching one (its objective is then trained)")
    p.add_argument("--out", default=str(RESULTS / "run_cost.json"))
    args = p.parse_args(argv)
    if args.teacher and "," in args.data:
        p.error("--teacher goes with one --data set")
    unknown = [d for d in args.data.split(",") if d not in DATA]
    if unknown:
        p.error(f"--data {args.data!r}: {', '.join(map(repr, unknown))} is not a teacher; allowed: {', '.join(DATA)}")
    try:
        args.arms = parse_arms(args.arms)
    except ValueError as e:
        p.error(f"--arms: {e}")
    if "kd" not in args.arms:
        p.error("--arms: kd is the reference of every ratio; list it")
    for name in args.arms:
        every = arm(name, VARIANT)[1].get("jac_every", 1)
        if jac_every_refusal(every, args.steps):  # the loop's own rule, said in the benchmark's words
            p.error(f"--arms: {name} applies its term every {every} steps, more than --steps {args.steps}")
    return args


def run_seconds(student, teacher, name: str, steps: int) -> float:
    finetuner, opts = arm(name, VARIANT)
    config = TrainConfig(steps=steps, seed=0, checkpoint_every=10**9, log_every=steps, **REFERENCE_LOOP)
    start = time.perf_counter()
    finetune(copy.deepcopy(student), teacher.model, get_finetuner(finetuner, scheduler=teacher.scheduler, **opts),
             teacher.train, config, watch=Watch(progress=False))
    return time.perf_counter() - start


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    results = {**record(__file__),
               "torch": torch.__version__, "threads": args.threads, "steps": args.steps, "rounds": args.rounds,
               "variant": VARIANT, "data": {}, **({"teacher": args.teacher} if args.teacher else {})}
    lines = ["# Whole-run cost per arm (idle, interleaved, median of rounds)", "",
             f"Command: `{results['command']}`; commit {results['commit']}; {results['cpu']}, "
             f"{args.threads} thread(s)", ""]
    for data in args.data.split(","):
        teacher = load_teacher(data, args.teacher)
        student, _ = prune_diffusers(teacher.model, "magnitude", REFERENCE_RATIO,
                                     example_inputs=default_example_inputs(teacher.model), round_to=None)
        runs: dict[str, list[float]] = {name: [] for name in args.arms}
        for _ in range(args.rounds):
            for name in args.arms:
                runs[name].append(run_seconds(student, teacher, name, args.steps))
                print(f"{data} {name}: {runs[name][-1]:.1f} s", flush=True)
        median = {name: statistics.median(v) for name, v in runs.items()}
        results["data"][data] = {"teacher_sha256": teacher.weights_sha256, "arms": {
            name: {"seconds": runs[name], "median_seconds": median[name], "vs_kd": median[name] / median["kd"]}
            for name in args.arms}}
        lines += [f"## {data} ({args.steps} steps)", "", "| arm | seconds (median) | vs kd |", "|---|---:|---:|"]
        lines += [f"| {name} | {median[name]:.1f} | {median[name] / median['kd']:.2f}x |" for name in args.arms]
        lines.append("")
        write_results(Path(args.out), results, "\n".join(lines))
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main(parse_args())
