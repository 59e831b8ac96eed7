"""Where the 2ndMatch term's weight comes from on the digits: its size per timestep.

For the pruned student of the quality benchmark (the shipped digits teacher, torch-pruning
magnitude at ``--ratio``, before finetuning) and 256 training digits per timestep, at the
teacher's own resolution (8x8): the teacher's sensitivity
s_T = ||J_T v||^2, the per-sample term (s_S - s_T)^2 (mean, median, 99th percentile, max) and the
per-sample DSM term ||eps_S - eps||^2 for scale. One random unit direction per sample, exact
(vjp); seeded; 1 thread.

    python benchmarks/jac_term_profile.py [--ratio 0.3] [--out benchmarks/results/ablation/jac_term_profile.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import options  # noqa: E402
from benchmarks.record import record  # noqa: E402
from nni_2ndmatch import prune_diffusers  # noqa: E402
from nni_2ndmatch.data import DigitsDataset  # noqa: E402
from nni_2ndmatch.files import write_results  # noqa: E402
from nni_2ndmatch.method import (  # noqa: E402
    default_scheduler,
    jacobian_sensitivity,
    model_output,
    sample_directions,
    squared_norm,
)
from nni_2ndmatch.models import load_diffusers_model  # noqa: E402
from nni_2ndmatch.models.digits import RESOLUTION, load_digits_teacher  # noqa: E402

TIMESTEPS = [0, 5, 20, 50, 100, 250, 500, 999]


def profile(samples: int = 256, ratio: float = 0.5, teacher_dir: str | None = None, dequantize: bool = False) -> dict:
    teacher = load_diffusers_model(teacher_dir).eval() if teacher_dir else load_digits_teacher().eval()
    student, _ = prune_diffusers(teacher, "magnitude", ratio, round_to=None)
    student.eval()
    scheduler = default_scheduler()
    data = DigitsDataset(RESOLUTION, dequantize=dequantize)  # the teacher's own 8x8
    torch.manual_seed(0)
    x0 = torch.stack([data[i] for i in range(samples)])
    g = torch.Generator().manual_seed(0)
    rows = []
    for t in TIMESTEPS:
        noise = torch.randn(x0.shape, generator=g)
        steps = torch.full((samples,), t)
        x_t = scheduler.add_noise(x0, noise, steps)
        v = sample_directions(x_t, generator=g)
        with torch.no_grad():
            dsm = squared_norm(model_output(student, x_t, steps) - noise)
        s_t = jacobian_sensitivity(teacher, x_t, steps.float(), v, mode="vjp").detach()
        s_s = jacobian_sensitivity(student, x_t, steps.float(), v, mode="vjp").detach()
        term = (s_s - s_t).pow(2)
        rows.append({"t": t, "teacher_sensitivity_mean": float(s_t.mean()),
                     "student_sensitivity_mean": float(s_s.mean()), "jac_term_mean": float(term.mean()),
                     "jac_term_median": float(term.median()), "jac_term_p99": float(term.quantile(0.99)),
                     "jac_term_max": float(term.max()), "dsm_term_mean": float(dsm.mean())})
    total = sum(r["jac_term_mean"] for r in rows)
    for r in rows:
        r["share_of_jac_term"] = r["jac_term_mean"] / total
    return {"samples_per_timestep": samples, "ratio": ratio, "resolution": RESOLUTION, "rows": rows,
            **record(__file__)}


def render(results: dict) -> str:
    lines = ["# The 2ndMatch term per timestep (digits, pruned student before finetuning)", "",
             f"Command: `{results['command']}`; "
             f"{results['samples_per_timestep']} digits per timestep at {results['resolution']}x"
             f"{results['resolution']}, one direction each, vjp. Shares are of the sum of the per-timestep means.", "",
             "| t | teacher ‖Jv‖² | student ‖Jv‖² | term mean | median | p99 | max | share | DSM term |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['t']} | {r['teacher_sensitivity_mean']:.3g} | {r['student_sensitivity_mean']:.3g} | "
                     f"{r['jac_term_mean']:.3g} | {r['jac_term_median']:.3g} | {r['jac_term_p99']:.3g} | "
                     f"{r['jac_term_max']:.3g} | {r['share_of_jac_term']:.3f} | {r['dsm_term_mean']:.3g} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ratio", type=options.fraction, default=0.5, help="channel share pruned (the paper's: 0.3)")
    p.add_argument("--teacher", type=options.model_folder,
                   help="a diffusers folder to profile instead of the shipped teacher")
    p.add_argument("--dequantize", action="store_true", help="dequantised digits (for a teacher trained on them)")
    p.add_argument("--out", default="benchmarks/results/ablation/jac_term_profile.json")
    args = p.parse_args(argv)
    if args.teacher and (Path(args.teacher) / "scheduler_config.json").is_file():
        p.error(f"--teacher {args.teacher}: a teacher with its own schedule (scheduler_config.json, e.g. flow "
                "matching); this profile noises by the reference DDPM schedule")
    return args


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    results = profile(ratio=args.ratio, teacher_dir=args.teacher, dequantize=args.dequantize)
    markdown = render(results)
    write_results(args.out, results, markdown)
    print(markdown)


if __name__ == "__main__":
    main(parse_args())
