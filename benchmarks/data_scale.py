"""Does a text-to-image run's memory grow with its data set? Peak anonymous memory at several sizes.

A Stable-Diffusion-shaped pipeline built here (a CLIP text encoder of width 768 over 77 tokens, as
SD 1.x; an AutoencoderKL with 4 latent channels; a small cross-attention UNet2DConditionModel of
cross-attention width 768) and an image folder of N image-caption pairs (64x64 PNGs, every
caption distinct). For each N, ``nni-2ndmatch run`` in a fresh process (prune, encode, 3 ``kd``
steps, 1 thread) while this script samples the anonymous memory of that process and its data
loader workers every 10 ms (the sum of their Pss_Anon: resident anonymous pages, a page shared by
a forked worker and its parent counted once; not the page cache of the mapped files); we report
the peak, the encoding throughput, and the growth per pair between sizes.

    python benchmarks/data_scale.py [--sizes 300,3000,30000] [--repeats 3] [--out benchmarks/results/data_scale.json]

A run's peak varies by tens of MiB (transient buffers of the encoders and the step, sampled), so
each size but the largest runs ``--repeats`` times, interleaved, and the medians are compared.
Linux only (/proc). The largest size writes about 7.6 GB of cache (float32 caption embeddings).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import options  # noqa: E402
from benchmarks.record import record  # noqa: E402
from nni_2ndmatch.files import write_results  # noqa: E402

MIB = 2**20
TOKENS, WIDTH = 77, 768  # SD 1.x's caption: 77 tokens of width 768


def write_pipeline(folder: Path) -> Path:
    """The SD-shaped pipeline (random weights; its size is what matters here)."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from nni_2ndmatch.models.tiny_pipelines import _byte_vocabulary

    vocab = _byte_vocabulary()
    (folder / "tokenizer").mkdir(parents=True)
    (folder / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    (folder / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": TOKENS}))
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, layers_per_block=1, sample_size=64)
    unet = UNet2DConditionModel(sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=WIDTH,
                                attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=1,
        num_attention_heads=12, max_position_embeddings=TOKENS, bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder,
                                   tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"), unet=unet,
                                   scheduler=DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                           beta_end=0.012),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder / "pipeline", safe_serialization=True)
    return folder / "pipeline"


def write_images(folder: Path, count: int) -> None:
    """``count`` 64x64 PNGs (random smooth colours) and a metadata.jsonl of distinct captions."""
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(count):
        base = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(base).resize((64, 64), Image.BILINEAR).save(folder / f"{i:06d}.png")
        lines.append(json.dumps({"file_name": f"{i:06d}.png", "text": f"photo number {i} of a {i % 7}-sided shape"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def pss_anon_kib(pid: int) -> int:
    """The anonymous memory of ``pid`` and all its descendants (data loader workers), in KiB: each
    process's proportional share (Pss_Anon), so pages a forked worker shares with its parent count once."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("Pss_Anon:"))
            with open(f"/proc/{p}/task/{p}/children") as f:
                stack += [int(c) for c in f.read().split()]
        except (OSError, StopIteration):
            continue
    return total


def measured_run(config: Path) -> dict:
    """One `nni-2ndmatch run` in a fresh process; its peak anonymous memory (sampled) and its log."""
    proc = subprocess.Popen([sys.executable, "-m", "nni_2ndmatch.cli", "run", str(config), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], pss_anon_kib(proc.pid))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    began = time.perf_counter()
    sampler.start()
    out, err = proc.communicate()
    seconds = time.perf_counter() - began
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"the run failed:\n{err[-3000:]}")
    return {"peak_anon_mib": peak[0] / 1024, "seconds": seconds, "log": err}


def encoding_rate(log: str) -> float | None:
    """Items (images and captions) encoded per second, from the run's log."""
    rates = [float(line.split("(")[-1].split()[0]) for line in log.splitlines() if "items/s)" in line]
    return rates[-1] if rates else None


# the same run on main 2e9ae81 (every latent and caption embedding in one in-memory tensor), as measured
# when issue "Real data sets" was filed: peak anonymous memory in MB
BEFORE = {300: 643, 3000: 4351}


def plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nni_2ndmatch.files import atomic_write_bytes

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    pairs = [r["pairs"] for r in runs.values()]
    ax.errorbar(pairs, [r["peak_anon_mib"] for r in runs.values()],
                yerr=[[r["peak_anon_mib"] - r["peak_anon_mib_min"] for r in runs.values()],
                      [r["peak_anon_mib_max"] - r["peak_anon_mib"] for r in runs.values()]],
                fmt="o-", capsize=3, label="encoded cache on disk (now; median and range)")
    ax.plot(list(BEFORE), [mb * 1e6 / MIB for mb in BEFORE.values()], "s--", color="#7f7f7f",
            label="one in-memory tensor (2e9ae81)")
    ax.set_xscale("log")
    ax.set_xlabel("image-caption pairs (77x768 captions)")
    ax.set_ylabel("peak anonymous memory (MiB)")
    ax.legend(frameon=False)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="300,3000,30000")
    p.add_argument("--repeats", type=options.count(1), default=3,
                   help="runs of each size but the largest, interleaved (the peak of a run varies by tens of MiB)")
    p.add_argument("--out", default="benchmarks/results/data_scale.json")
    args = p.parse_args(argv)
    try:
        args.sizes = [options.count(1)(s) for s in args.sizes.split(",")]
    except argparse.ArgumentTypeError as e:
        p.error(f"--sizes {args.sizes}: {e}")
    if len(args.sizes) < 2 or args.sizes != sorted(set(args.sizes)):
        p.error(f"--sizes {','.join(map(str, args.sizes))}: give two or more sizes, each larger than the one before "
                "(the growth from the first to the last is the result)")
    return args


def main(args: argparse.Namespace) -> dict:
    sizes = args.sizes
    order = [n for _ in range(args.repeats) for n in sizes[:-1]] + sizes[-1:]
    measured: dict[int, list[dict]] = {n: [] for n in sizes}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pipeline = write_pipeline(work / "sd")
        for n in sizes:
            write_images(work / f"images-{n}", n)
        for n in order:
            raw = {"version": 1, "model": {"teacher": {"path": str(pipeline)}},
                   "data": {"path": str(work / f"images-{n}"), "resolution": 64, "encode_batch_size": 32},
                   "pruning": {"pruner": "magnitude", "sparse_ratio": 0.3},
                   "finetune": {"finetuner": "kd", "steps": 3, "batch_size": 4, "checkpoint_every": 3},
                   "output_dir": str(work / "run"), "threads": 1}
            config = work / "cfg.yaml"
            config.write_text(yaml.safe_dump(raw))
            run = measured_run(config)
            cache = sum(f.stat().st_size for f in (work / "run" / "cache").glob("*"))
            measured[n].append({"peak_anon_mib": run["peak_anon_mib"], "seconds": run["seconds"],
                                "cache_mib": cache / MIB, "encoded_items_per_s": encoding_rate(run["log"])})
            print(f"N={n}: peak anonymous memory {run['peak_anon_mib']:.0f} MiB, {run['seconds']:.0f} s, cache "
                  f"{cache / MIB:.0f} MiB", flush=True)
            shutil.rmtree(work / "run")
    runs = {}
    for n, rows in measured.items():
        peaks = sorted(r["peak_anon_mib"] for r in rows)
        runs[str(n)] = {"pairs": n, "runs": rows, "peak_anon_mib": statistics.median(peaks),
                        "peak_anon_mib_min": peaks[0], "peak_anon_mib_max": peaks[-1],
                        "cache_mib": rows[0]["cache_mib"],
                        "encoded_items_per_s": statistics.median(r["encoded_items_per_s"] or 0 for r in rows)}
    first, last = runs[str(sizes[0])], runs[str(sizes[-1])]
    growth = [{"from": a, "to": b, "kib_per_pair": (runs[str(b)]["peak_anon_mib"] -
                                                    runs[str(a)]["peak_anon_mib"]) * 1024 / (b - a)}
              for a, b in zip(sizes, sizes[1:])]
    results = {**record(__file__),
               "platform": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, 1 thread",
               "caption": [TOKENS, WIDTH], "runs": runs, "growth": growth,
               "kib_per_pair": (last["peak_anon_mib"] - first["peak_anon_mib"]) * 1024 / (sizes[-1] - sizes[0])}
    lines = ["# Memory against data-set size (text-to-image, SD 1.x caption size)", "",
             f"Command: `{results['command']}` ({results['platform']})", "",
             "| image-caption pairs | peak anonymous memory, MiB (median, range) | run seconds | cache on disk (MiB) "
             "| encoded items/s |",
             "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['pairs']} | {r['peak_anon_mib']:.0f} ({r['peak_anon_mib_min']:.0f}-{r['peak_anon_mib_max']:.0f}, "
              f"{len(r['runs'])} run(s)) | {statistics.median(x['seconds'] for x in r['runs']):.0f} | "
              f"{r['cache_mib']:.0f} | {r['encoded_items_per_s']:.0f} |" for r in runs.values()]
    lines += ["", f"Growth from {sizes[0]} to {sizes[-1]} pairs: {results['kib_per_pair']:.2f} KiB per pair (medians); "
              + "; ".join(f"{g['from']} to {g['to']}: {g['kib_per_pair']:.2f}" for g in growth) + ".", ""]
    lines += [f"Before (main 2e9ae81, one in-memory tensor): {BEFORE[300]} MB at 300 pairs, {BEFORE[3000]} MB at 3000.",
              "", f"![memory]({Path(args.out).with_suffix('.png').name})", ""]
    write_results(Path(args.out), results, "\n".join(lines))
    plot(runs, Path(args.out).with_suffix(".png"))
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main(parse_args())
