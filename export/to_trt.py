"""Build a TensorRT engine from a model folder or an ONNX file.

    python export/to_trt.py --model DIR|--onnx FILE --out student.plan --precision fp16|fp32 --batch 1,16,64
                            [--timing-cache FILE]

Needs TensorRT 10+ and a CUDA GPU. Writes OUT and OUT.json (TensorRT version, GPU, compute
capability, input shapes, precision); with --model, also the checked ONNX beside it (OUT without
.plan, + .onnx). Exit codes: 0 built, 1 failed, 2 bad input, 3 TensorRT or a CUDA GPU missing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="pruned-student folder or diffusers folder (exported to ONNX first)")
    source.add_argument("--onnx", help="an ONNX file from export/to_onnx.py")
    p.add_argument("--out", required=True, help="engine file to write (metadata: OUT.json)")
    p.add_argument("--precision", default="fp16", help="fp16 (default) or fp32")
    p.add_argument("--batch", default="1,16,64", help="min,opt,max batch of the engine (default 1,16,64)")
    p.add_argument("--timing-cache", default=None, help="TensorRT timing cache: reused if present, then updated")
    p.add_argument("--workspace-gib", type=float, default=None, help="builder workspace limit (GiB)")
    p.add_argument("--seq-len", type=int, default=None, help="with --model: text length of encoder_hidden_states "
                   "(default: what the model's pipeline feeds: 333 for SD3, else 77)")
    args = p.parse_args(argv)
    if args.workspace_gib is not None and not args.workspace_gib > 0:
        p.error(f"--workspace-gib={args.workspace_gib} is not allowed: it must be > 0 (leave it out for TensorRT's "
                "default)")
    if args.seq_len is not None and args.onnx:
        p.error("--seq-len applies with --model only: an ONNX file's text length was set when it was exported")
    return args


def main(args: argparse.Namespace) -> int:
    from nni_2ndmatch.deploy.errors import DeployError
    from nni_2ndmatch.deploy.tensorrt import (
        PRECISIONS,
        build_engine,
        check_onnx_file,
        needs_fp16_onnx,
        parse_batches,
        require_tensorrt,
    )

    batches = parse_batches(args.batch)
    if args.precision not in PRECISIONS:
        raise DeployError(f"--precision={args.precision!r} is unknown; allowed: {', '.join(PRECISIONS)}")
    if Path(args.out).suffix == ".onnx":  # with --model its ONNX goes to OUT.onnx: the engine would overwrite it
        raise DeployError(f"--out {args.out!r} ends in .onnx; give the engine file, e.g. student.plan")
    source = Path(args.model or args.onnx)
    if not source.exists():
        raise DeployError(f"{'--model' if args.model else '--onnx'} {str(source)!r} does not exist")
    if args.onnx:
        check_onnx_file(source)  # a corrupted file is bad input (exit 2), whatever is installed
    require_tensorrt()  # before loading anything heavy: exit 3 where TensorRT or the GPU is missing
    onnx_path = source
    if args.model:
        from nni_2ndmatch.deploy import export_onnx, load_model
        from nni_2ndmatch.deploy.model_io import check_seq_len

        model, info = load_model(source)
        check_seq_len(model, args.seq_len)
        onnx_path = Path(args.out).with_suffix(".onnx")
        fp16 = needs_fp16_onnx(args.precision)
        export_onnx(model, onnx_path, fp16=fp16, seq_len=args.seq_len, source=info)
        print(f"wrote {onnx_path} ({'fp16' if fp16 else 'fp32'}, checked against PyTorch)")
    meta = build_engine(onnx_path, args.out, precision=args.precision, batches=batches,
                        timing_cache=args.timing_cache, workspace_gib=args.workspace_gib)
    print(f"wrote {args.out}: TensorRT {meta['tensorrt_version']}, {meta['gpu']} (sm {meta['compute_capability']}), "
          f"{meta['precision']}, batch {batches[0]}..{batches[2]} (opt {batches[1]})")
    return 0


if __name__ == "__main__":
    from nni_2ndmatch.deploy.script import run_main

    args = parse_args()
    sys.exit(run_main(lambda: main(args)))
