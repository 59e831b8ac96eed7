"""Is the loop's speed set by the model or by reading images? Costly images against pre-resized ones.

The same 512 images twice: 384x384 JPEGs (quality 90; crops of scikit-image's sample photos) and
the same crops already resized to 32x32 PNGs. A ``kd`` finetune of the DDPM-CIFAR10 layout at
``--width`` (0.125 by default: a step short enough on one CPU thread for reading to matter, as a
full-width step is on a GPU; pruned 0.3 by magnitude), batch 16 at 32x32, reads each folder through
the loop's data loader;
we time the steps after the first ``--warmup`` (the workers' start-up excluded) and report seconds
per step, interleaved A B A B over ``--repeats`` runs, medians, and the ratio costly / pre-resized
(goal: at most 1.2). The costly folder is also read with ``num_workers: 0`` (in the training
process), to show what the workers take off the critical path. 1 torch thread; needs scikit-image
(its sample photos ship in the wheel).

    python benchmarks/data_loading.py [--steps 60] [--repeats 3] [--out benchmarks/results/data_loading.json]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import options  # noqa: E402
from benchmarks.record import record  # noqa: E402
from nni_2ndmatch import TrainConfig, finetune, get_finetuner, prune_diffusers  # noqa: E402
from nni_2ndmatch.data import ImageFolderDataset, auto_workers  # noqa: E402
from nni_2ndmatch.files import write_results  # noqa: E402
from nni_2ndmatch.models import build_builtin  # noqa: E402
from nni_2ndmatch.pruning import default_example_inputs  # noqa: E402
from nni_2ndmatch.training import Watch  # noqa: E402

SIZE, RESOLUTION, COUNT = 384, 32, 512


def write_folders(root: Path) -> tuple[Path, Path]:
    """(costly, pre-resized): the same crops as 384px JPEGs and as 32px PNGs."""
    from PIL import Image
    from skimage import data as samples

    photos = [getattr(samples, name)() for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")]
    photos = [Image.fromarray(p).convert("RGB") for p in photos]
    costly, small = root / "jpeg-384", root / "png-32"
    costly.mkdir()
    small.mkdir()
    rng = np.random.default_rng(0)
    for i in range(COUNT):
        photo = photos[i % len(photos)]
        side = int(rng.integers(SIZE // 2, min(photo.size)))
        left, top = (int(rng.integers(0, photo.width - side + 1)), int(rng.integers(0, photo.height - side + 1)))
        crop = photo.crop((left, top, left + side, top + side)).resize((SIZE, SIZE), Image.BICUBIC)
        crop.save(costly / f"{i:04d}.jpg", quality=90)
        crop.resize((RESOLUTION, RESOLUTION), Image.BICUBIC).save(small / f"{i:04d}.png")
    return costly, small


def seconds_per_step(student, teacher, folder: Path, steps: int, warmup: int, workers: int | str) -> float:
    """Seconds per step after ``warmup`` steps (the start-up of the workers excluded)."""
    data = ImageFolderDataset(folder, RESOLUTION, channels=3)
    times: dict[int, float] = {}
    config = TrainConfig(steps=steps, batch_size=16, seed=0, num_workers=workers, log_every=1, ema_decay=None)
    finetune(copy.deepcopy(student), teacher, get_finetuner("kd"), data, config, watch=Watch(progress=False,
             on_log=lambda record: times.setdefault(int(record["step"]), time.perf_counter())))
    return (times[steps] - times[warmup]) / (steps - warmup)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60, help="steps per run (more than --warmup)")
    p.add_argument("--warmup", type=options.count(1), default=10, help="untimed steps (the workers' start-up)")
    p.add_argument("--repeats", type=options.count(1), default=3)
    p.add_argument("--width", type=float, default=0.125, help="channel multiplier of the DDPM-CIFAR10 layout")
    p.add_argument("--out", default="benchmarks/results/data_loading.json")
    args = p.parse_args(argv)
    if args.steps <= args.warmup:
        p.error(f"--steps={args.steps} must exceed --warmup={args.warmup} (the untimed steps)")
    if importlib.util.find_spec("skimage") is None:
        p.error("the images are scikit-image's sample photos, and scikit-image is not installed: "
                "pip install scikit-image")
    return args


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    teacher = build_builtin("ddpm-cifar10", width=args.width)
    student, _ = prune_diffusers(teacher, "magnitude", 0.3, example_inputs=default_example_inputs(teacher))
    with tempfile.TemporaryDirectory() as tmp:
        costly, small = write_folders(Path(tmp))
        workers = auto_workers(ImageFolderDataset(small, RESOLUTION, channels=3))
        variants = {"pre-resized 32px PNG": (small, "auto"), "384px JPEG": (costly, "auto"),
                    "384px JPEG, num_workers 0": (costly, 0)}
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.repeats):  # interleaved
            for name, (folder, n) in variants.items():
                times[name].append(seconds_per_step(student, teacher, folder, args.steps, args.warmup, n))
                print(f"{name}: {times[name][-1]:.4f} s/step", flush=True)
    medians = {name: statistics.median(v) for name, v in times.items()}
    base = medians["pre-resized 32px PNG"]
    results = {**record(__file__),
               "platform": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, 1 thread",
               "auto_workers": workers, "width": args.width, "batch": 16, "resolution": RESOLUTION, "images": COUNT,
               "seconds_per_step": times, "median_seconds_per_step": medians,
               "ratio_to_pre_resized": {name: m / base for name, m in medians.items()}}
    lines = ["# The loop's time with costly images", "", f"Command: `{results['command']}` ({results['platform']}; "
             f"num_workers auto = {workers})", "", "| images | s/step (median) | runs | vs pre-resized |",
             "|---|---:|---|---:|"]
    lines += [f"| {name} | {medians[name]:.4f} | {', '.join(f'{t:.4f}' for t in times[name])} | "
              f"{medians[name] / base:.2f}x |" for name in variants]
    write_results(Path(args.out), results, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main(parse_args())
