"""Latency of a dense teacher and its pruned student, side by side, on each backend.

    python export/bench.py --teacher DIR --student DIR --backends torch,onnxruntime,tensorrt --batch 1,16
                           --out results.json [--threads 1] [--repeats 20] [--warmup 3] [--device auto]

Writes OUT (JSON), OUT with .md (a table) and .png (a bar chart). Backends that cannot run here
(TensorRT without a GPU, say) are skipped with the reason in the results. --threads defaults to 1:
single-thread CPU timings are the reproducible ones (no thread-pool scaling or contention) and
compare models by their work; set it to the core count for throughput on a dedicated machine.
Exit codes: 0 measured, 2 bad input, 3 none of the backends can run here.
"""

from __future__ import annotations

import argparse
import sys

from nni_2ndmatch.deploy.script import batch_list


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True, help="dense model folder (diffusers or pruned-student format)")
    p.add_argument("--student", required=True, help="pruned-student folder (or any model folder)")
    p.add_argument("--backends", default="torch,onnxruntime",
                   help="comma-separated: torch, torch-compile, aoti, onnxruntime, tensorrt")
    p.add_argument("--batch", type=batch_list, default=[1, 16], help="batch sizes, e.g. 1,16 (default)")
    p.add_argument("--out", required=True, help="results JSON (the .md and .png go beside it)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch and onnxruntime (default 1)")
    p.add_argument("--repeats", type=int, default=20, help="timed runs per model and batch (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs first (default 3)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    p.add_argument("--trt-precision", help="TensorRT engine precision: fp16 (default) or fp32")
    p.add_argument("--seq-len", type=int, default=None, help="text length of encoder_hidden_states (default: what "
                   "the model's pipeline feeds: 333 for SD3, else 77)")
    p.add_argument("--exporter", help="ONNX exporter: dynamo (default) or torchscript")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    from nni_2ndmatch.deploy import DeployError, load_model
    from nni_2ndmatch.deploy.bench import Setup, render_markdown, run_benchmark, write_reports
    from nni_2ndmatch.deploy.model_io import check_seq_len

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    given = {"trt_precision": args.trt_precision, "exporter": args.exporter}
    setup = Setup(backends=backends, batches=args.batch, device=args.device, threads=args.threads,
                  repeats=args.repeats, warmup=args.warmup, seq_len=args.seq_len,
                  **{k: v for k, v in given.items() if v is not None})  # its checks come before any model loads
    for flag, value, users in (("--trt-precision", args.trt_precision, ["tensorrt"]),
                               ("--exporter", args.exporter, ["onnxruntime", "tensorrt"])):
        if value is not None and not set(users) & set(backends):
            raise DeployError(f"{flag} {value} applies to the {' and '.join(users)} backend(s) only, which "
                              f"--backends {args.backends} leaves out")
    teacher, teacher_info = load_model(args.teacher)
    student, student_info = load_model(args.student)
    check_seq_len(teacher, args.seq_len)
    results = run_benchmark(teacher, student, setup, teacher_info=teacher_info, student_info=student_info)
    print(render_markdown(results))
    print("wrote " + ", ".join(map(str, write_reports(results, args.out))))
    return 0


if __name__ == "__main__":
    from nni_2ndmatch.deploy.script import run_main

    args = parse_args()
    sys.exit(run_main(lambda: main(args)))
