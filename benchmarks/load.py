"""Load: does memory stay flat over a long finetune, and does a big image folder stay on disk?

1. 1000 finetuning steps (2ndmatch, vjp) of the tiny-unet's magnitude-pruned student (0.3) on the
   built-in digits, batch 16, a checkpoint every 100 steps, in this process: the resident set size
   (RSS) is read every 10 steps; we report its growth from step 100 (warm) to step 1000.
2. The CLI (``nni-2ndmatch finetune``, a fresh process each) on an image folder of 100 and of
   10,000 RGB PNGs (64x64, trained at 32x32; teacher: the DDPM-CIFAR10 layout at width 0.25, pruned
   0.3 by magnitude; dsm, 20 steps, batch 8): the peak RSS of each run. Decoded as float32 the
   10,000 images would take 10,000 x 3 x 32 x 32 x 4 B = 117 MiB; a folder read lazily costs
   (almost) nothing more than the small one.

All with 1 thread. Linux only (/proc).

    python benchmarks/load.py [--steps 1000] [--images 10000] [--out benchmarks/results/load.json]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import options  # noqa: E402
from benchmarks.record import record  # noqa: E402
from nni_2ndmatch import finetune, get_finetuner, prune_diffusers, save_pruned  # noqa: E402
from nni_2ndmatch.data import DigitsDataset  # noqa: E402
from nni_2ndmatch.files import write_results  # noqa: E402
from nni_2ndmatch.models import build_builtin  # noqa: E402
from nni_2ndmatch.pruning import default_example_inputs  # noqa: E402
from nni_2ndmatch.training import TrainConfig, Watch  # noqa: E402

MIB = 2**20
SMALL_FOLDER = 100  # images in the folder the large one is compared with


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def long_finetune(steps: int, work: Path) -> dict:
    teacher = build_builtin("tiny-unet")
    student, _ = prune_diffusers(teacher, "magnitude", 0.3, example_inputs=default_example_inputs(teacher))
    config = TrainConfig(steps=steps, batch_size=16, checkpoint_every=100, log_every=10, seed=0)
    samples: list[tuple[int, float]] = []
    began = time.perf_counter()
    finetune(student, teacher, get_finetuner("2ndmatch"), DigitsDataset(16), config, work / "long",
             watch=Watch(progress=False, on_log=lambda rec: samples.append((int(rec["step"]), rss_bytes() / MIB))))
    return {"steps": steps, "seconds": time.perf_counter() - began, **summarise(dict(samples), steps)}


def summarise(rss: dict[int, float], steps: int) -> dict:
    """RSS growth from step 100 (warm) to the end, and the least-squares slope after step 200."""
    warm = rss[min(100, steps)]
    late = np.array([(s, v) for s, v in rss.items() if s >= 200]) if steps >= 400 else np.array(list(rss.items()))
    slope = float(np.polyfit(late[:, 0], late[:, 1], 1)[0]) * 1000
    return {"rss_mib_at_step": rss, "rss_mib_warm": warm, "rss_mib_end": rss[steps],
            "rss_growth_mib": rss[steps] - warm, "rss_slope_mib_per_1000_steps": slope}


def image_folder(folder: Path, count: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    digits = DigitsDataset(64).images  # [N, 1, 64, 64] in [-1, 1]
    rng = np.random.default_rng(0)
    for i in range(count):
        grey = ((digits[i % len(digits), 0].numpy() + 1) * 127.5).astype(np.float32)
        tint = rng.uniform(0.3, 1.0, size=3).astype(np.float32)
        rgb = (grey[..., None] * tint).clip(0, 255).astype(np.uint8)
        Image.fromarray(rgb, "RGB").save(folder / f"{i:05d}.png")


def cli_peak_rss(config: Path) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of one `nni-2ndmatch finetune` in a fresh process."""
    code = ("import resource, sys; from nni_2ndmatch.cli import main; rc = main(sys.argv[1:]); "
            "print('PEAK_RSS_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
    began = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code, "finetune", str(config), "--no-progress"],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if r.returncode != 0:
        raise RuntimeError(f"the CLI failed:\n{r.stderr}")
    kib = next(int(line.split()[1]) for line in r.stdout.splitlines() if line.startswith("PEAK_RSS_KIB"))
    return kib / 1024, time.perf_counter() - began


def big_folder(counts: list[int], work: Path) -> dict:
    teacher = build_builtin("ddpm-cifar10", width=0.25)
    student, _ = prune_diffusers(teacher, "magnitude", 0.3, example_inputs=default_example_inputs(teacher))
    save_pruned(student, work / "student")
    runs = {}
    for count in counts:
        image_folder(work / f"images-{count}", count)
        raw = {"version": 1,
               "model": {"teacher": {"builtin": "ddpm-cifar10", "width": 0.25},
                         "student": {"path": str(work / "student")}},
               "data": {"path": str(work / f"images-{count}"), "resolution": 32, "channels": 3},
               "finetune": {"finetuner": "dsm", "steps": 20, "batch_size": 8, "checkpoint_every": 20},
               "output_dir": str(work / f"run-{count}")}
        config = work / f"cfg-{count}.yaml"
        config.write_text(yaml.safe_dump(raw))
        peak, seconds = cli_peak_rss(config)
        runs[str(count)] = {"images": count, "peak_rss_mib": peak, "seconds": seconds}
    small, large = runs[str(min(counts))], runs[str(max(counts))]
    return {"runs": runs, "decoded_float32_mib": max(counts) * 3 * 32 * 32 * 4 / MIB,
            "peak_rss_difference_mib": large["peak_rss_mib"] - small["peak_rss_mib"]}


def render(results: dict) -> str:
    lf, bf = results["long_finetune"], results["big_folder"]
    lines = ["# Load benchmark", "", f"Command: `{results['command']}` ({results['platform']})", "",
             f"## {lf['steps']} finetuning steps (tiny-unet student, 2ndmatch, batch 16, checkpoint every 100)", "",
             f"RSS at step 100: {lf['rss_mib_warm']:.1f} MiB; at step {lf['steps']}: {lf['rss_mib_end']:.1f} MiB; "
             f"growth {lf['rss_growth_mib']:+.1f} MiB; least-squares slope from step 200 on: "
             f"{lf['rss_slope_mib_per_1000_steps']:+.1f} MiB per 1000 steps ({lf['seconds']:.0f} s).", "",
             "## The CLI on an image folder", "", "| images | peak RSS (MiB) | seconds |", "|---|---|---|"]
    lines += [f"| {r['images']} | {r['peak_rss_mib']:.1f} | {r['seconds']:.1f} |" for r in bf["runs"].values()]
    lines += ["", f"Difference: {bf['peak_rss_difference_mib']:+.1f} MiB; the large folder decoded as float32 "
              f"would take {bf['decoded_float32_mib']:.0f} MiB.", ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=options.count(1), default=1000)
    p.add_argument("--images", type=options.count(SMALL_FOLDER + 1), default=10000,
                   help=f"the large folder's images (compared with a folder of {SMALL_FOLDER})")
    p.add_argument("--out", default="benchmarks/results/load.json")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        results = {**record(__file__),
                   "platform": f"{os.cpu_count()} CPUs, torch {torch.__version__}, 1 thread",
                   "long_finetune": long_finetune(args.steps, Path(tmp)),
                   "big_folder": big_folder([SMALL_FOLDER, args.images], Path(tmp))}
    results["peak_rss_self_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = Path(args.out)
    markdown = render(results)
    write_results(out, results, markdown)
    print(markdown)
    return results


if __name__ == "__main__":
    main(parse_args())
