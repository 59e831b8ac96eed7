"""Step time of a short finetune with the real loop, per strategy, on one of step_cost.py's layouts.

Teacher: ``--layout`` (default ddpm-cifar10: 35.7M parameters; attention-unet; dit-s2), random
init (step time does not depend on the weights); student: prune_diffusers(teacher, "magnitude",
0.3). Data: random images of the teacher's input shape, random class labels for the DiT (no
download; the content does not change the cost). Each variant runs ``--steps`` steps of
``nni_2ndmatch.finetune`` (AdamW, clipping, EMA) at ``--batch``, in ``--rounds`` rounds (the
order of the variants reversed every other round, a fresh student each time); the step time is the
median over the steps after ``--warmup`` of every round (the loop reads the loss every step, which
synchronises the GPU). Meant for a dedicated GPU; for CPU figures see step_cost.py.
Peak memory: torch.cuda.max_memory_allocated on a GPU (the largest over the rounds).

    python benchmarks/finetune_step_time.py --device cuda [--batch 256] [--steps 15] [--rounds 3]
    # writes benchmarks/results/finetune_step_time_<device>[_<layout>].json (+ .md) with the device named
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import options  # noqa: E402
from benchmarks.record import record  # noqa: E402
from benchmarks.step_cost import LAYOUTS  # noqa: E402
from nni_2ndmatch import Runtime, TrainConfig, finetune, get_finetuner, prune_diffusers  # noqa: E402
from nni_2ndmatch.files import write_results  # noqa: E402
from nni_2ndmatch.models import default_example_inputs, example_conditioning  # noqa: E402
from nni_2ndmatch.training import Watch  # noqa: E402

VARIANTS = {
    "dsm": ("dsm", {}, "no"),
    "kd": ("kd", {}, "no"),
    "2ndmatch-vjp": ("2ndmatch", {"mode": "vjp"}, "no"),
    "2ndmatch-jvp": ("2ndmatch", {"mode": "jvp"}, "no"),
    "2ndmatch-fd": ("2ndmatch", {"mode": "fd"}, "no"),
    "2ndmatch-vjp-frac0.25": ("2ndmatch", {"mode": "vjp", "jac_fraction": 0.25}, "no"),
    "kd-bf16": ("kd", {}, "bf16"),
    "2ndmatch-vjp-bf16": ("2ndmatch", {"mode": "vjp"}, "bf16"),
}


class RandomImages(torch.utils.data.Dataset):
    """Random images of ``model``'s input shape, with random conditioning where it takes some."""

    def __init__(self, model: torch.nn.Module, n: int) -> None:
        cfg = model.config
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(n, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g) * 2 - 1
        self.cond = example_conditioning(model, n)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        if not self.cond:
            return self.x[i]
        return {"sample": self.x[i], **{k: v[i] for k, v in self.cond.items()}}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def time_variant(name: str, teacher, student, data, args) -> tuple[list[float], float | None]:
    """Seconds of each step after the warm-up, and the peak GPU memory in MiB (None on the CPU)."""
    kind, opts, precision = VARIANTS[name]
    config = TrainConfig(steps=args.steps, batch_size=args.batch, checkpoint_every=10**9, log_every=1,
                         mixed_precision=precision, seed=0)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    seconds: list[float] = []
    finetune(student, teacher, get_finetuner(kind, **opts), data, config, runtime=Runtime(device),
             watch=Watch(progress=False, on_log=lambda record: seconds.append(record["seconds"])))
    per_step = [b - a for a, b in zip(seconds, seconds[1:])][args.warmup:]
    return per_step, torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def render(results: dict) -> str:
    kd = next(r for r in results["rows"] if r["variant"] == "kd")["seconds_per_step"]
    lines = [f"# Finetuning step time, {results.get('layout', 'ddpm-cifar10')} layout", "",
             f"Device: {results['device']}; torch {results['torch']}; batch {results['batch']}; "
             f"student MACs ratio {results['macs_ratio']:.3f}. Command: `{results['command']}`", "",
             "| variant | s/step | vs kd | peak MiB |", "|---|---|---|---|"]
    for r in results["rows"]:
        peak = f"{r['peak_memory_mib']:.0f}" if "peak_memory_mib" in r else "-"
        lines.append(f"| {r['variant']} | {r['seconds_per_step']:.4f} | {r['seconds_per_step'] / kd:.2f} | {peak} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--layout", choices=list(LAYOUTS), default="ddpm-cifar10")
    p.add_argument("--batch", type=options.count(1), default=256)
    p.add_argument("--steps", type=options.count(1), default=15)
    p.add_argument("--warmup", type=options.count(0), default=3)
    p.add_argument("--rounds", type=options.count(1), default=3)
    p.add_argument("--width", type=float, default=1.0, help="teacher width (smaller: a quick check of the script)")
    p.add_argument("--variants", type=options.names(VARIANTS, required=["kd"]), default=list(VARIANTS),
                   help="comma-separated, from: " + ", ".join(VARIANTS) + " (with kd: times are ratios to it)")
    p.add_argument("--out")
    args = p.parse_args(argv)
    if args.steps <= args.warmup + 1:
        p.error(f"--steps={args.steps} must exceed --warmup + 1 ({args.warmup + 1})")
    return args


def main(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    teacher = LAYOUTS[args.layout](args.width).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned, report = prune_diffusers(teacher, "magnitude", 0.3, example_inputs=default_example_inputs(teacher))
    data = RandomImages(teacher, max(4 * args.batch, 256))
    names = args.variants
    steps: dict[str, list[float]] = {n: [] for n in names}
    rounds: dict[str, list[float]] = {n: [] for n in names}
    peaks: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            per_step, peak = time_variant(name, teacher, copy.deepcopy(pruned), data, args)
            steps[name] += per_step
            rounds[name].append(statistics.median(per_step))
            peaks[name] += [] if peak is None else [peak]
            print(f"round {r} {name}: {rounds[name][-1]:.4f} s/step", flush=True)
    rows = []
    for name in names:
        kind, opts, precision = VARIANTS[name]
        rows.append({"variant": name, "finetuner": kind, "options": opts, "mixed_precision": precision,
                     "seconds_per_step": statistics.median(steps[name]), "round_medians": rounds[name],
                     "steps_timed": len(steps[name]),
                     **({"peak_memory_mib": max(peaks[name])} if peaks[name] else {})})
    device = torch.device(args.device)
    results = {"device": device_name(device), "torch": torch.__version__, "layout": args.layout, "batch": args.batch,
               "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "width": args.width,
               "macs_ratio": report["macs_ratio"],
               **record(__file__),
               "rows": rows}
    suffix = "" if args.layout == "ddpm-cifar10" else f"_{args.layout}"
    out = Path(args.out or f"benchmarks/results/finetune_step_time_{device.type}{suffix}.json")
    markdown = render(results)
    write_results(out, results, markdown)
    print(markdown)
    return results


if __name__ == "__main__":
    main(parse_args())
