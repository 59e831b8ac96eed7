"""Latency of the DDPM-CIFAR10 U-Net layout and its magnitude-pruned student (0.3), CPU or GPU.

Teacher: build_builtin("ddpm-cifar10") (35.7M parameters, random init, seed 0). Student:
prune_diffusers(teacher, "magnitude", 0.3) (``--round-to``: the channels it keeps per layer are a
multiple of this, default 8). Both on torch CPU and onnxruntime CPU, batch 1 and 16
(``--batches``), 1 thread, interleaved in one process (see nni_2ndmatch.deploy.bench). Target: at
batch >= 16 on onnxruntime CPU, the student's speedup is at least 0.9x the speedup its MACs
predict (speedup_vs_macs >= 0.9). With ``--device cuda`` the variants are the GPU ones of the chosen
backends (torch: fp32 eager and fp16 in a CUDA graph; torch-compile and aoti: fp16), timed by CUDA
events; no target there.

    python benchmarks/latency.py [--repeats 20] [--out FILE]   # default FILE: benchmarks/results/latency_DEVICE.json
    python benchmarks/latency.py --device cuda --backends torch --batches 1,16,128,512 \
        --out benchmarks/results/latency_cuda.json
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import options  # noqa: E402
from benchmarks.record import record  # noqa: E402
from nni_2ndmatch import prune_diffusers  # noqa: E402
from nni_2ndmatch.deploy.bench import Setup, render_markdown, run_benchmark, write_reports  # noqa: E402
from nni_2ndmatch.deploy.script import batch_list, run_main  # noqa: E402
from nni_2ndmatch.models import build_builtin, default_example_inputs  # noqa: E402

TARGET = 0.9


def main(args: argparse.Namespace) -> dict:
    setup = Setup(backends=args.backends.split(","), batches=args.batches, device=args.device, threads=args.threads,
                  repeats=args.repeats, warmup=args.warmup)  # its checks before the models are built
    teacher = build_builtin("ddpm-cifar10").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the coarse-ratio warning: the achieved ratios are in the results
        student, _ = prune_diffusers(teacher, "magnitude", 0.3, example_inputs=default_example_inputs(teacher),
                                     round_to=args.round_to)
    results = run_benchmark(
        teacher, student, setup,
        teacher_info={"source": "build_builtin('ddpm-cifar10'), seed 0", "kind": "builtin", "class": "UNet2DModel"},
        student_info={"source": f"prune_diffusers(teacher, 'magnitude', 0.3), round_to={args.round_to}",
                      "kind": "pruned",
                      "class": "UNet2DModel"})
    results.update(record(__file__))
    print(render_markdown(results))
    if args.device == "cpu":
        rows = [r for r in results["results"] if r["variant"] == "onnxruntime-cpu" and r["batch"] >= 16]
        results["target"] = {"rule": f"speedup_vs_macs >= {TARGET} at batch >= 16 on onnxruntime-cpu",
                             "met": bool(rows) and all(r["speedup_vs_macs"] >= TARGET for r in rows)}
        print(f"target ({results['target']['rule']}): {'met' if results['target']['met'] else 'MISSED'}")
    print("wrote " + ", ".join(map(str, write_reports(results, args.out))))
    return results


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--backends", default="torch,onnxruntime")
    p.add_argument("--batches", type=batch_list, default=[1, 16])
    p.add_argument("--round-to", type=options.count(1), default=8,
                   help="channels kept per layer rounded to a multiple of this")
    p.add_argument("--out", help="default: benchmarks/results/latency_DEVICE.json")
    args = p.parse_args(argv)
    args.out = args.out or f"benchmarks/results/latency_{args.device}.json"
    return args


if __name__ == "__main__":
    args = parse_args()

    def measure() -> None:  # a bad setting: one error line and exit 2; a device missing here: exit 3
        main(args)

    sys.exit(run_main(measure))
