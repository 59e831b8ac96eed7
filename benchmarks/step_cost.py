"""Cost of one finetuning step (loss + backward) for dsm, kd and 2ndmatch in each estimator mode.

Layouts (``--layout``; random init, the student is the same layout at 0.75 width):
- ddpm-cifar10 (default): the DDPM-CIFAR10 U-Net (35.7M parameters, 6.06 GMACs; student 20.1M,
  3.41 GMACs = 0.56x, the paper's pruned 6.1G -> 3.4G), 3x32x32;
- attention-unet: an attention-heavy U-Net, channels 32/64/64, self-attention at 16x16 and 8x8 with
  8 heads of dimension 8, 3x32x32;
- dit-s2: the DiT-S/2 layout (12 blocks, 6 heads of dimension 64, 2x2 patches) on 4x32x32
  latents, 1000 classes.
Batch 8, fp32, 1 thread. Timings are interleaved across variants in one process, warm-up
excluded, median of repeats. Peak memory: each variant once in a fresh subprocess, the growth of
the resident set during one step, sampled every 2 ms (activations and graphs, not the models;
Linux only).

    python benchmarks/step_cost.py [--layout ddpm-cifar10] [--repeats 5] [--out benchmarks/results/step_cost.json]
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
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import options  # noqa: E402
from benchmarks.record import record  # noqa: E402
from nni_2ndmatch import get_finetuner, jacobian_safe  # noqa: E402
from nni_2ndmatch.files import atomic_write_json  # noqa: E402
from nni_2ndmatch.method import output_and_sensitivity, sample_directions  # noqa: E402
from nni_2ndmatch.models import default_example_inputs, example_conditioning  # noqa: E402
from nni_2ndmatch.models.builtin import ddpm_cifar10  # noqa: E402
from nni_2ndmatch.pruning import macs_params  # noqa: E402

VARIANTS = {
    "dsm": ("dsm", {}),
    "kd": ("kd", {}),
    "2ndmatch-vjp": ("2ndmatch", {"mode": "vjp"}),
    "2ndmatch-jvp": ("2ndmatch", {"mode": "jvp"}),
    "2ndmatch-fd": ("2ndmatch", {"mode": "fd"}),
    "2ndmatch-vjp-frac0.25": ("2ndmatch", {"mode": "vjp", "jac_fraction": 0.25}),
    "2ndmatch-auto": ("2ndmatch", {}),  # the default: mode auto, resolved from the teacher
}
BATCH = 8


def attention_unet(width: float = 1.0):
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=tuple(int(c * width) for c in (32, 64, 64)), norm_num_groups=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                       attention_head_dim=int(8 * width))


def dit_s2(width: float = 1.0):
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(num_attention_heads=6, attention_head_dim=int(64 * width), in_channels=4,
                                 out_channels=8, num_layers=12, sample_size=32, patch_size=2,
                                 num_embeds_ada_norm=1000)


LAYOUTS = {"ddpm-cifar10": ddpm_cifar10, "attention-unet": attention_unet, "dit-s2": dit_s2}


def setup(layout: str = "ddpm-cifar10", seed: int = 0):
    torch.manual_seed(seed)
    teacher = LAYOUTS[layout](1.0).eval().requires_grad_(False)
    student = LAYOUTS[layout](0.75).train()
    cfg = teacher.config
    x0 = torch.randn(BATCH, cfg.in_channels, cfg.sample_size, cfg.sample_size).clamp(-1, 1)
    noise = torch.randn_like(x0)
    timesteps = torch.randint(0, 1000, (BATCH,))
    return teacher, student, x0, noise, timesteps, example_conditioning(teacher, BATCH)


def step(ft, student, teacher, x0, noise, timesteps, cond) -> None:
    loss, _ = ft.loss(student, teacher, x0, noise, timesteps, **cond)
    loss.backward()
    student.zero_grad(set_to_none=True)


def macs(model) -> float:
    return macs_params(model, default_example_inputs(model))[0]


def fd_error(student, x0, timesteps, cond) -> float:
    """Max relative error of the fd estimate of ||J v||^2 against the exact jvp, fp32, student in
    eval mode (in train mode a DiT drops class labels at random, and the jvp evaluation and the
    difference's would see different labels)."""
    x_t = x0 * 0.7 + 0.7 * torch.randn_like(x0)
    v = sample_directions(x_t)
    training = student.training
    student.eval()
    try:
        with torch.no_grad(), jacobian_safe(student):
            _, exact = output_and_sensitivity(student, x_t, timesteps, v, "jvp", create_graph=False, **cond)
            _, approx = output_and_sensitivity(student, x_t, timesteps, v, "fd", create_graph=False, **cond)
    finally:
        student.train(training)
    return float(((approx - exact).abs() / exact).max())


def peak_memory(layout: str, name: str) -> float:
    """Growth of the resident memory (MiB) during one step of ``name``, in a fresh process."""
    code = f"import benchmarks.step_cost as b; print(b._measure_memory({layout!r}, {name!r}))"
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


def peak_growth_mib(fn: Callable[[], Any], interval: float = 0.002) -> float:
    """Growth of the resident set (MiB) at its peak while ``fn()`` runs, sampled every ``interval`` s."""
    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(interval)

    before = _rss()
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return (peak[0] - before) / 2**20


def _measure_memory(layout: str, name: str) -> float:
    torch.set_num_threads(1)
    teacher, student, x0, noise, timesteps, cond = setup(layout)
    ft = get_finetuner(VARIANTS[name][0], **VARIANTS[name][1])
    step(ft, student, teacher, x0[:1], noise[:1], timesteps[:1], {k: v[:1] for k, v in cond.items()})  # every grad
    return peak_growth_mib(lambda: step(ft, student, teacher, x0, noise, timesteps, cond))


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    teacher, student, x0, noise, timesteps, cond = setup(args.layout)
    fts = {name: get_finetuner(kind, **opts) for name, (kind, opts) in VARIANTS.items() if name in args.variants}
    for ft in fts.values():  # warm-up
        step(ft, student, teacher, x0, noise, timesteps, cond)
    times = {name: [] for name in fts}
    for r in range(args.repeats):
        for name, ft in fts.items():
            t0 = time.perf_counter()
            step(ft, student, teacher, x0, noise, timesteps, cond)
            times[name].append(time.perf_counter() - t0)
        print(f"round {r + 1}/{args.repeats}: " + ", ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items()),
              flush=True)
    median = {n: statistics.median(t) for n, t in times.items()}
    memory = {n: peak_memory(args.layout, n) for n in fts} if not args.no_memory else {}
    results = {
        **record(__file__),
        "setup": {"layout": args.layout, "teacher": f"{args.layout} layout, width 1.0",
                  "student": f"{args.layout} layout, width 0.75", "batch": BATCH,
                  "input": list(x0.shape[1:]), "dtype": "float32", "threads": 1,
                  "repeats": args.repeats, "teacher_macs": macs(teacher), "student_macs": macs(student),
                  "teacher_params": sum(p.numel() for p in teacher.parameters()),
                  "student_params": sum(p.numel() for p in student.parameters())},
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "cpu": platform.processor() or platform.machine(), "device": "cpu"},
        "fd_max_rel_error_fp32": fd_error(student, x0, timesteps, cond),
        "modes": {n: ft.options().get("mode") for n, ft in fts.items()},  # auto: the mode it chose
        "variants": {n: {"seconds_median": median[n], "seconds_all": times[n],
                         "time_vs_kd": median[n] / median["kd"],
                         **({"time_vs_dsm": median[n] / median["dsm"]} if "dsm" in median else {}),
                         **({"peak_mib": memory[n], "memory_vs_kd": memory[n] / memory["kd"]} if memory else {})}
                     for n in fts},
    }
    print(f"\n{'variant':24s} {'s/step':>8s} {'x kd':>6s} {'x dsm':>6s} {'peak MiB':>9s} {'mem x kd':>8s}")
    for n, v in results["variants"].items():
        print(f"{n:24s} {v['seconds_median']:8.2f} {v['time_vs_kd']:6.2f} {v.get('time_vs_dsm', float('nan')):6.2f} "
              f"{v.get('peak_mib', float('nan')):9.0f} {v.get('memory_vs_kd', float('nan')):8.2f}")
    print(f"fd estimator max relative error (fp32): {results['fd_max_rel_error_fp32']:.2e}")
    atomic_write_json(args.out, results)
    print(f"wrote {args.out}")
    return results


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layout", choices=list(LAYOUTS), default="ddpm-cifar10")
    p.add_argument("--variants", type=options.names(VARIANTS, required=["kd"]), default=list(VARIANTS),
                   help="comma-separated, from: " + ", ".join(VARIANTS) + " (with kd: times are ratios to it)")
    p.add_argument("--repeats", type=options.count(1), default=5)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--out", default="benchmarks/results/step_cost.json")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
