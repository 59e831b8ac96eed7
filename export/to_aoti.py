"""Compile a pruned student or a diffusers model folder into an AOTInductor package, checked against PyTorch.

    python export/to_aoti.py --model DIR --out student.pt2 [--device cpu|cuda] [--batch 1,16,64] [--fp16]

The package (.pt2) holds the weights and compiled kernels and runs without the model's code:
torch._inductor.aoti_load_package("student.pt2")(sample, timestep[, conditioning]), with sample
[B,C,H,W] float32, timestep [B] float32 (+ encoder_hidden_states float32 or class_labels int64), any
B from 1 to the largest --batch, on the device it was built for. It runs on fresh random inputs at
each --batch before it is written; the errors against PyTorch go to OUT.json. Exit codes: 0 written,
1 error above tolerance or compiler failure (nothing written), 2 bad input, 3 no CUDA GPU (--device
cuda) or no C++ compiler (--device cpu).
"""

from __future__ import annotations

import argparse
import sys

from nni_2ndmatch.deploy.script import batch_list


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="pruned-student folder or diffusers folder (save_pretrained)")
    p.add_argument("--out", required=True, help="package to write, e.g. student.pt2 (its report: OUT.json)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda: where the package runs")
    p.add_argument("--batch", type=batch_list, default=[1, 16, 64],
                   help="batch sizes checked (default 1,16,64); the package takes any batch up to the largest")
    p.add_argument("--fp16", action="store_true", help="float16 weights and compute (cuda); float32 inputs and output")
    p.add_argument("--tolerance", type=float, default=None,
                   help="max relative error vs PyTorch (default 1e-4 on cpu, 1e-2 on cuda: TF32 or fp16)")
    p.add_argument("--seq-len", type=int, default=None, help="text length of encoder_hidden_states (default: what "
                   "the model's pipeline feeds: 333 for SD3, else 77)")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    from nni_2ndmatch.deploy import export_aoti, load_model
    from nni_2ndmatch.deploy.aoti import check_options
    from nni_2ndmatch.deploy.artefact import sidecar_path
    from nni_2ndmatch.deploy.model_io import check_seq_len

    check_options(args.device, tuple(args.batch), args.fp16, args.tolerance)  # before the model loads
    model, info = load_model(args.model)
    check_seq_len(model, args.seq_len)
    report = export_aoti(model, args.out, device=args.device, batches=args.batch, fp16=args.fp16,
                         tolerance=args.tolerance, seq_len=args.seq_len, source=info)
    parity = report["parity"]
    errors = ", ".join(f"batch {b}: max rel {e['max_rel_error']:.3g}" for b, e in parity["batches"].items())
    print(f"wrote {args.out} ({report['device']}, {report['precision']}, batch 1..{report['batch_range'][1]}, "
          f"compiled in {report['compile_seconds']:.0f} s)")
    print(f"package vs PyTorch: {errors} (tolerance {parity['tolerance']:.3g}); report: {sidecar_path(args.out)}")
    print(f"use: {report['usage']}")
    return 0


if __name__ == "__main__":
    from nni_2ndmatch.deploy.script import run_main

    args = parse_args()
    sys.exit(run_main(lambda: main(args)))
