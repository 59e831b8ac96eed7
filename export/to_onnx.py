"""Export a pruned student or a diffusers model folder to ONNX, checked against PyTorch.

    python export/to_onnx.py --model DIR --out student.onnx [--opset 20] [--batch-dynamic] [--fp16]
    python export/to_onnx.py --pipeline OUT/pipeline --out DIR [--opset 20] [--fp16]

With --pipeline, a Stable Diffusion text-to-image pipeline folder (e.g. a run's OUT/pipeline) becomes
the folder diffusers' OnnxStableDiffusionPipeline loads: text_encoder/, unet/, vae_encoder/,
vae_decoder/ (each model.onnx checked against PyTorch), the tokenizer, the scheduler and
model_index.json (--fp16: the U-Net in float16).

Inputs: sample [B,C,H,W] float32, timestep [B] float32 (+ encoder_hidden_states float32 or
class_labels int64); output: out. The graph runs in onnxruntime on fresh random inputs at batch 1
and 3 before it is written; the errors against PyTorch go to OUT.json. Exit codes: 0 written,
1 error above tolerance or exporter failure (nothing written), 2 bad input.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="pruned-student folder or diffusers folder (save_pretrained)")
    source.add_argument("--pipeline", help="a Stable Diffusion pipeline folder: the whole pipeline, for "
                                           "OnnxStableDiffusionPipeline")
    p.add_argument("--out", required=True, help="ONNX file to write (its report: OUT.json); with --pipeline, a folder")
    p.add_argument("--opset", type=int, default=20, help="ONNX opset (default 20, which TensorRT 10 parses)")
    p.add_argument("--batch-dynamic", action=argparse.BooleanOptionalAction, default=True,
                   help="one dynamic batch axis (default); --no-batch-dynamic fixes the batch at 1")
    p.add_argument("--fp16", action="store_true", help="float16 weights and compute; float32 inputs and output")
    p.add_argument("--exporter", default="dynamo", help="dynamo (default) or torchscript (the legacy exporter)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="max relative error vs PyTorch (default 1e-4, with --fp16 1e-2)")
    p.add_argument("--no-simplify", action="store_true", help="do not simplify the graph with onnxslim")
    p.add_argument("--seq-len", type=int, default=None, help="text length of encoder_hidden_states (default: what "
                   "the model's pipeline feeds: 333 for SD3, else 77)")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    from nni_2ndmatch.deploy import export_onnx, load_model
    from nni_2ndmatch.deploy.artefact import sidecar_path
    from nni_2ndmatch.deploy.model_io import check_seq_len
    from nni_2ndmatch.deploy.onnx_export import check_options

    if args.pipeline:
        from nni_2ndmatch.deploy import DeployError
        from nni_2ndmatch.deploy.onnx_pipeline import export_onnx_pipeline

        given = [flag for flag, value, default in (
            ("--exporter", args.exporter, "dynamo"), ("--tolerance", args.tolerance, None),
            ("--no-simplify", args.no_simplify, False), ("--no-batch-dynamic", args.batch_dynamic, True),
            ("--seq-len", args.seq_len, None)) if value != default]
        if given:
            raise DeployError(f"{', '.join(given)}: an option of --model only; --pipeline exports every part with "
                              "the dynamo exporter, a dynamic batch, the pipeline's text length and its own tolerances")
        report = export_onnx_pipeline(args.pipeline, args.out, opset=args.opset, fp16=args.fp16)
        for name, part in report["parts"].items():
            print(f"{part['file']}: onnxruntime vs PyTorch max rel {part['parity']['max_rel_error']:.3g}")
        print(f"wrote {args.out} (load it with diffusers' OnnxStableDiffusionPipeline.from_pretrained)")
        return 0

    check_options(args.opset, args.exporter, args.tolerance)  # before the model loads
    model, info = load_model(args.model)
    check_seq_len(model, args.seq_len)
    report = export_onnx(model, args.out, opset=args.opset, fp16=args.fp16, batch_dynamic=args.batch_dynamic,
                         exporter=args.exporter, simplify=not args.no_simplify, tolerance=args.tolerance,
                         seq_len=args.seq_len, source=info)
    parity = report["parity"]
    errors = ", ".join(f"batch {b}: max abs {e['max_abs_error']:.3g}, max rel {e['max_rel_error']:.3g}"
                       for b, e in parity["batches"].items())
    print(f"wrote {args.out} ({report['precision']}, opset {report['opset']}, {report['nodes']} nodes; "
          f"{report['simplify_note']})")
    print(f"onnxruntime vs PyTorch: {errors} (tolerance {parity['tolerance']:.3g}); report: {sidecar_path(args.out)}")
    return 0


if __name__ == "__main__":
    from nni_2ndmatch.deploy.script import run_main

    args = parse_args()
    sys.exit(run_main(lambda: main(args)))
