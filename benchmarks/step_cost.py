"""Cost of one finetuning step (loss + backward) for dsm, kd and 2ndmatch in each estimator mode.

Teacher: the DDPM-CIFAR10 U-Net layout (35.7M parameters, 6.06 GMACs, random init). Student: the
same layout at 0.75 width (20.1M parameters, 3.41 GMACs = 0.56x, the paper's pruned 6.1G -> 3.4G).
Batch 8, 32x32, fp32, 1 thread. Timings are interleaved across variants in one process, warm-up
excluded, median of repeats. Peak memory: each variant once in a fresh subprocess, the growth of
the resident set during one step, sampled every 2 ms (activations and graphs, not the models;
Linux only).

    python benchmarks/step_cost.py [--repeats 5] [--out benchmarks/results/step_cost.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from nni_2ndmatch import get_finetuner, jacobian_safe
from nni_2ndmatch.files import atomic_write_json
from nni_2ndmatch.method import output_and_sensitivity, sample_directions
from nni_2ndmatch.models.builtin import ddpm_cifar10

VARIANTS = {
    "dsm": ("dsm", {}),
    "kd": ("kd", {}),
    "2ndmatch-vjp": ("2ndmatch", {"mode": "vjp"}),
    "2ndmatch-jvp": ("2ndmatch", {"mode": "jvp"}),
    "2ndmatch-fd": ("2ndmatch", {"mode": "fd"}),
    "2ndmatch-vjp-frac0.25": ("2ndmatch", {"mode": "vjp", "jac_fraction": 0.25}),
}
BATCH, RES = 8, 32


def setup(seed: int = 0):
    torch.manual_seed(seed)
    teacher = ddpm_cifar10(1.0).eval().requires_grad_(False)
    student = ddpm_cifar10(0.75).train()
    x0 = torch.randn(BATCH, 3, RES, RES).clamp(-1, 1)
    noise = torch.randn_like(x0)
    timesteps = torch.randint(0, 1000, (BATCH,))
    return teacher, student, x0, noise, timesteps


def step(ft, student, teacher, x0, noise, timesteps) -> None:
    loss, _ = ft.loss(student, teacher, x0, noise, timesteps)
    loss.backward()
    student.zero_grad(set_to_none=True)


def macs(model) -> float:
    import torch_pruning as tp

    ops, _ = tp.utils.count_ops_and_params(model, example_inputs={"sample": torch.randn(1, 3, RES, RES),
                                                                  "timestep": torch.zeros(1)})
    return float(ops)


def fd_error(student, x0, timesteps) -> float:
    """Max relative error of the fd estimate of ||J v||^2 against the exact jvp, fp32, student."""
    x_t = x0 * 0.7 + 0.7 * torch.randn_like(x0)
    v = sample_directions(x_t)
    with torch.no_grad(), jacobian_safe(student):
        _, exact = output_and_sensitivity(student, x_t, timesteps, v, "jvp", create_graph=False)
        _, approx = output_and_sensitivity(student, x_t, timesteps, v, "fd", create_graph=False)
    return float(((approx - exact).abs() / exact).max())


def peak_memory(name: str) -> float:
    """Growth of the resident memory (MiB) during one step of ``name``, in a fresh process."""
    code = f"import benchmarks.step_cost as b; print(b._measure_memory({name!r}))"
    root = Path(__file__).resolve().parent.parent
    # Large blocks straight from mmap, so that freed memory leaves the resident set at once and the
    # resident set follows the live tensors.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True,
                         env=env)
    return float(out.stdout.strip().splitlines()[-1])


def _rss() -> int:
    with open("/proc/self/statm") as f:  # Linux: resident pages
        return int(f.read().split()[1]) * resource.getpagesize()


def _measure_memory(name: str) -> float:
    torch.set_num_threads(1)
    teacher, student, x0, noise, timesteps = setup()
    ft = get_finetuner(VARIANTS[name][0], **VARIANTS[name][1])
    step(ft, student, teacher, x0[:1], noise[:1], timesteps[:1])  # allocate every weight and grad once
    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.002)

    before = _rss()
    sampler = threading.Thread(target=sample)
    sampler.start()
    step(ft, student, teacher, x0, noise, timesteps)
    done.set()
    sampler.join()
    return (peak[0] - before) / 2**20


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    teacher, student, x0, noise, timesteps = setup()
    fts = {name: get_finetuner(kind, **opts) for name, (kind, opts) in VARIANTS.items()}
    for ft in fts.values():  # warm-up
        step(ft, student, teacher, x0, noise, timesteps)
    times = {name: [] for name in fts}
    for r in range(args.repeats):
        for name, ft in fts.items():
            t0 = time.perf_counter()
            step(ft, student, teacher, x0, noise, timesteps)
            times[name].append(time.perf_counter() - t0)
        print(f"round {r + 1}/{args.repeats}: " + ", ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items()),
              flush=True)
    median = {n: statistics.median(t) for n, t in times.items()}
    memory = {n: peak_memory(n) for n in fts} if not args.no_memory else {}
    results = {
        "setup": {"teacher": "ddpm-cifar10 layout, width 1.0", "student": "ddpm-cifar10 layout, width 0.75",
                  "batch": BATCH, "resolution": RES, "dtype": "float32", "threads": 1,
                  "repeats": args.repeats, "teacher_macs": macs(teacher), "student_macs": macs(student),
                  "teacher_params": sum(p.numel() for p in teacher.parameters()),
                  "student_params": sum(p.numel() for p in student.parameters())},
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "cpu": platform.processor() or platform.machine(), "device": "cpu"},
        "fd_max_rel_error_fp32": fd_error(student, x0, timesteps),
        "variants": {n: {"seconds_median": median[n], "seconds_all": times[n],
                         "time_vs_kd": median[n] / median["kd"], "time_vs_dsm": median[n] / median["dsm"],
                         **({"peak_mib": memory[n], "memory_vs_kd": memory[n] / memory["kd"]} if memory else {})}
                     for n in fts},
    }
    print(f"\n{'variant':24s} {'s/step':>8s} {'x kd':>6s} {'x dsm':>6s} {'peak MiB':>9s} {'mem x kd':>8s}")
    for n, v in results["variants"].items():
        print(f"{n:24s} {v['seconds_median']:8.2f} {v['time_vs_kd']:6.2f} {v['time_vs_dsm']:6.2f} "
              f"{v.get('peak_mib', float('nan')):9.0f} {v.get('memory_vs_kd', float('nan')):8.2f}")
    print(f"fd estimator max relative error (fp32): {results['fd_max_rel_error_fp32']:.2e}")
    atomic_write_json(args.out, results)
    print(f"wrote {args.out}")
    return results


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--out", default="benchmarks/results/step_cost.json")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
