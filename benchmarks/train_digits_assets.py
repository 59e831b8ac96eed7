"""Train the built-in digits assets and write them into nni_2ndmatch/assets (the shipped files).

    python benchmarks/train_digits_assets.py --what classifier          # ~1 min on 2 CPU cores
    python benchmarks/train_digits_assets.py --what teacher --work runs/digits_teacher   # resumable

The teacher is a DDPM (epsilon prediction, linear betas 1e-4..0.02, 1000 steps) trained with the
package's own loop (the ``dsm`` strategy, no teacher), EMA weights shipped. Seeds are fixed, so
the command reproduces the files on the same software stack.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nni_2ndmatch import TrainConfig, finetune, get_finetuner  # noqa: E402
from nni_2ndmatch.data import DigitsDataset  # noqa: E402
from nni_2ndmatch.files import atomic_write_json, save_tensors  # noqa: E402
from nni_2ndmatch.models import digits_unet, save_diffusers_model  # noqa: E402
from nni_2ndmatch.models.digits import ASSETS, CLASSIFIER_FILE, RESOLUTION, TEACHER_DIR, train_classifier  # noqa: E402

TEACHER_RECIPE = dict(steps=5000, batch_size=64, lr=1e-3, lr_schedule="cosine", warmup_steps=200, grad_clip=1.0,
                      ema_decay=0.999, antithetic=True, seed=0, checkpoint_every=250, keep_checkpoints=2, log_every=50)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--what", choices=["classifier", "teacher"], required=True)
    parser.add_argument("--work", default="runs/digits_teacher", help="teacher: checkpoints (resumable)")
    parser.add_argument("--steps", type=int, default=TEACHER_RECIPE["steps"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dequantize", action="store_true", help="teacher: train on dequantised digits (uniform "
                        "noise within each grey level); written to --out, not to the shipped assets")
    parser.add_argument("--out", help="teacher: the folder to write it to (default: the shipped asset)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    ASSETS.mkdir(parents=True, exist_ok=True)
    if args.what == "classifier":
        model, accuracy = train_classifier(seed=0)
        save_tensors(CLASSIFIER_FILE, model.state_dict())
        atomic_write_json(ASSETS / "digits_classifier.json",
                          {"architecture": "DigitsClassifier", "seed": 0, "test_accuracy": round(accuracy, 4),
                           "test_images": len(DigitsDataset(RESOLUTION, "test")),
                           "command": "python benchmarks/train_digits_assets.py --what classifier"})
        print(f"held-out accuracy {accuracy:.4f}; wrote {CLASSIFIER_FILE}")
        return
    recipe = {**TEACHER_RECIPE, "steps": args.steps}
    work = Path(args.work)
    if args.dequantize and not args.out:
        parser.error("--dequantize needs --out (the shipped teacher is trained on the digits as they are)")
    out = Path(args.out) if args.out else TEACHER_DIR
    result = finetune(digits_unet(), None, get_finetuner("dsm"),
                      DigitsDataset(RESOLUTION, "train", dequantize=args.dequantize),
                      TrainConfig(**recipe), work, resume=(work / "checkpoints").exists())
    save_diffusers_model(result.student, out)
    final = result.history[-1] if result.history else {}
    atomic_write_json(out.parent / f"{out.name}.json" if args.out else ASSETS / "digits_teacher.json",
                      {"recipe": recipe, "steps": result.step, "final": final, "resolution": RESOLUTION,
                       "dequantize": args.dequantize, "command": "python benchmarks/train_digits_assets.py "
                       + " ".join(sys.argv[1:])})
    print(json.dumps(final))


if __name__ == "__main__":
    main()
