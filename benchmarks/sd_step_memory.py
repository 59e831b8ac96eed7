"""Seconds and peak memory of one finetuning step at Stable Diffusion scale, on the CPU.

Teacher: a UNet2DConditionModel in the SD-1.5 configuration (860M parameters, random weights);
student: the same configuration at 0.75 width (channels rounded to GroupNorm's 32 groups). Batch
1, 4x64x64 latents (512x512 images), 77 text tokens of width 768 (random). Each variant (kd;
2ndmatch vjp; vjp with jac_fraction 0.25; fd; each without and with gradient checkpointing of the
student) runs one loss + backward step in a fresh process; peak memory is the growth of the
resident set during that step, sampled every 10 ms (activations, graphs and gradients, not the
models; Linux only).

    python benchmarks/sd_step_memory.py [--threads 2] [--variants kd,2ndmatch-fd] [--out ...json]

Rows of variants not run this time are kept from the JSON at --out (same setup).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import options  # noqa: E402
from benchmarks.record import record  # noqa: E402
from benchmarks.step_cost import peak_growth_mib  # noqa: E402
from nni_2ndmatch import get_finetuner  # noqa: E402
from nni_2ndmatch.files import write_results  # noqa: E402
from nni_2ndmatch.method import checkpoint_as_forward  # noqa: E402

VARIANTS = {
    "kd": ("kd", {}), "2ndmatch-vjp": ("2ndmatch", {"mode": "vjp"}),
    "2ndmatch-vjp-frac0.25": ("2ndmatch", {"mode": "vjp", "jac_fraction": 0.25}),
    "2ndmatch-fd": ("2ndmatch", {"mode": "fd"}),
}


def sd15_unet(width: float = 1.0):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
        attention_head_dim=8, block_out_channels=tuple(32 * round(c * width / 32) for c in (320, 640, 1280, 1280)),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))


def one_step(name: str, checkpointing: bool) -> dict:
    """One loss + backward step of ``name`` in this process: seconds and peak memory growth (MiB)."""
    torch.manual_seed(0)
    teacher = sd15_unet().eval().requires_grad_(False)
    student = sd15_unet(0.75).train()
    if checkpointing:
        student.enable_gradient_checkpointing(checkpoint_as_forward)
    x0, noise = torch.randn(1, 4, 64, 64).clamp(-1, 1), torch.randn(1, 4, 64, 64)
    text, t = torch.randn(1, 77, 768), torch.tensor([500])
    kind, opts = VARIANTS[name]
    finetuner = get_finetuner(kind, **opts)
    seconds = []

    def step() -> None:
        start = time.perf_counter()
        loss, _ = finetuner.loss(student, teacher, x0, noise, t, encoder_hidden_states=text)
        loss.backward()
        seconds.append(time.perf_counter() - start)

    peak_mib = peak_growth_mib(step, interval=0.01)
    return {"seconds": seconds[0], "peak_mib": peak_mib,
            "teacher_params": sum(p.numel() for p in teacher.parameters()),
            "student_params": sum(p.numel() for p in student.parameters())}


def kept_rows(out: Path) -> list[dict]:
    """The rows an earlier run wrote to ``out`` (none if there is no such file)."""
    return json.loads(out.read_text()).get("rows", []) if out.exists() else []


def main(args: argparse.Namespace) -> dict:
    out_path = Path(args.out)
    names = args.variants
    previous = json.loads(out_path.read_text()) if out_path.exists() else {}
    rows = [r for r in previous.get("rows", []) if r["variant"] not in names and r.get("threads", args.threads)
            == args.threads]
    made = record(__file__)  # each row records the commit and CPU that made it (rows of earlier commands are kept)
    for name in names:
        for checkpointing in (False, True):
            code = (f"import torch, json, benchmarks.sd_step_memory as b; torch.set_num_threads({args.threads}); "
                    f"print(json.dumps(b.one_step({name!r}, {checkpointing})))")
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # freed memory leaves the resident set
            out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent,
                                 capture_output=True, text=True, check=True, env=env)
            row = {"variant": name, "gradient_checkpointing": checkpointing, "threads": args.threads,
                   "commit": made["commit"], "cpu": made["cpu"],
                   **json.loads(out.stdout.strip().splitlines()[-1])}
            rows.append(row)
            print(f"{name:24s} checkpointing={checkpointing!s:5s} {row['seconds']:7.1f} s {row['peak_mib']:8.0f} MiB",
                  flush=True)
    rows.sort(key=lambda r: (list(VARIANTS).index(r["variant"]), r["gradient_checkpointing"]))
    kd = next(r for r in rows if r["variant"] == "kd" and not r["gradient_checkpointing"])
    for r in rows:
        r["time_vs_kd"], r["memory_vs_kd"] = r["seconds"] / kd["seconds"], r["peak_mib"] / kd["peak_mib"]
    results = {"setup": {"teacher": "UNet2DConditionModel, SD-1.5 configuration", "student": "the same at 0.75 width",
                         "teacher_params": kd["teacher_params"], "student_params": kd["student_params"],
                         "batch": 1, "latents": [4, 64, 64], "text": [77, 768], "dtype": "float32",
                         "threads": args.threads, "steps_per_variant": 1},
               "environment": {"torch": torch.__version__, "python": platform.python_version()},
               "commands": [*previous.get("commands", []), made["command"]],
               "rows": rows}  # rows of other variants come from the earlier commands (same setup)
    lines = ["# One finetuning step at SD-1.5 scale (CPU)", "",
             "Commands: " + "; ".join(f"`{c}`" for c in results["commands"]) +
             f". {args.threads} threads, batch 1, 64x64 latents, one step per variant in a fresh process.", "",
             "| variant | gradient checkpointing | s/step | x kd | peak MiB | x kd |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {'yes' if r['gradient_checkpointing'] else 'no'} | {r['seconds']:.1f} | "
              f"{r['time_vs_kd']:.2f} | {r['peak_mib']:.0f} | {r['memory_vs_kd']:.2f} |" for r in rows]
    write_results(out_path, results, "\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return results


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=options.count(1), default=2)
    p.add_argument("--variants", type=options.names(VARIANTS), default=list(VARIANTS),
                   help="comma-separated, from: " + ", ".join(VARIANTS))
    p.add_argument("--out", default="benchmarks/results/sd_step_memory.json")
    args = p.parse_args(argv)
    if "kd" not in args.variants and not any(r["variant"] == "kd" and r.get("threads", args.threads) == args.threads
                                             for r in kept_rows(Path(args.out))):
        p.error(f"--variants: kd is needed (the rows are ratios to it), and {args.out} holds no kd row at "
                f"--threads {args.threads}")
    return args


if __name__ == "__main__":
    main(parse_args())
