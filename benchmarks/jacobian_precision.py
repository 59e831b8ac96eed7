"""Accuracy of the fp32 Jacobian estimators on a GPU, with and without TF32, against float64.

Model: build_builtin("ddpm-cifar10") (35.7M parameters, seed 0; accuracy depends on the layout and
the precision, not on training), 8 random inputs of 3x32x32 at timesteps spread over [0, 999], one
random unit direction each. Reference: float64 jvp (for jvp and fd) and vjp (for vjp) on the same
device. For each precision setting (TF32 allowed in cuDNN convolutions and cuBLAS matmuls, or not)
and estimator, the per-sample relative error |s - s_ref| / s_ref (median and max over the batch).
"fd-unguarded" is the central difference computed here directly, without the library's
guard (``fp32_precision("ieee")``): what TF32 does to a finite difference.

    python benchmarks/jacobian_precision.py --device cuda
    # writes benchmarks/results/jacobian_precision_<device>.json (+ .md) with the device named
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import options  # noqa: E402
from benchmarks.finetune_step_time import device_name  # noqa: E402
from benchmarks.record import record  # noqa: E402
from nni_2ndmatch.files import write_results  # noqa: E402
from nni_2ndmatch.method import (  # noqa: E402
    DEFAULT_FD_STEP,
    fp32_precision,
    jacobian_safe,
    jacobian_sensitivity,
    model_output,
    sample_directions,
    squared_norm,
)
from nni_2ndmatch.models import build_builtin  # noqa: E402


def unguarded_fd(model, x, t, v, h=DEFAULT_FD_STEP):
    with jacobian_safe(model):
        return squared_norm((model_output(model, x + h * v, t) - model_output(model, x - h * v, t)) / (2 * h))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=options.count(1), default=8)
    p.add_argument("--out")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    model = build_builtin("ddpm-cifar10").to(device).eval()
    model64 = build_builtin("ddpm-cifar10").double().to(device).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, generator=g).to(device)
    t = torch.linspace(0, 999, args.batch).round().long().to(device)
    v = sample_directions(x, torch.Generator(device=device).manual_seed(1) if device.type == "cuda" else None)
    with torch.no_grad():
        ref = {"jvp": jacobian_sensitivity(model64, x.double(), t, v.double(), mode="jvp")}
    ref["vjp"] = jacobian_sensitivity(model64, x.double(), t, v.double(), mode="vjp").detach()
    rows = []
    for tf32 in (True, False):
        for mode in ("jvp", "vjp", "fd", "fd-unguarded"):
            with fp32_precision("tf32" if tf32 else "ieee"):
                if mode == "fd-unguarded":
                    with torch.no_grad():
                        s = unguarded_fd(model, x, t, v)
                else:
                    s = jacobian_sensitivity(model, x, t, v, mode=mode).detach()
            target = ref["vjp" if mode == "vjp" else "jvp"]
            err = ((s.double() - target).abs() / target).tolist()
            rows.append({"tf32": tf32, "estimator": mode, "median_rel_error": statistics.median(err),
                         "max_rel_error": max(err)})
            print(rows[-1], flush=True)
    results = {"device": device_name(device), "torch": torch.__version__, "batch": args.batch,
               "fd_step": DEFAULT_FD_STEP, "timesteps": t.tolist(),
               **record(__file__),
               "rows": rows}
    lines = ["# fp32 Jacobian estimators against float64, DDPM-CIFAR10 layout", "",
             f"Device: {results['device']}; torch {results['torch']}; batch {args.batch}; fd step {DEFAULT_FD_STEP}. "
             f"Command: `{results['command']}`", "",
             "| TF32 allowed | estimator | median rel. error | max rel. error |", "|---|---|---|---|"]
    lines += [f"| {r['tf32']} | {r['estimator']} | {r['median_rel_error']:.2e} | {r['max_rel_error']:.2e} |"
              for r in rows]
    out = Path(args.out or f"benchmarks/results/jacobian_precision_{device.type}.json")
    write_results(out, results, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main(parse_args())
