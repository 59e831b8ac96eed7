"""The finetuning loop: seeded, resumable, with EMA, atomic checkpoints and per-term logs.

Device placement, gradient synchronisation and "only the main process writes" all live in
``Runtime``; a multi-process runtime (Hugging Face Accelerate) can replace it without touching
the loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from ..data import batch_indices, collate
from ..errors import NonFiniteLossError
from ..files import atomic_write_text, load_tensors
from ..finetuners import Finetuner
from ..method import checkpoint_as_forward, sample_timesteps
from ..utils import requires_grad
from .checkpoints import Checkpoints, load_optimizer_state, optimizer_state
from .options import TrainConfig
from .runtime import Runtime, finetuner_rng

logger = logging.getLogger(__name__)


CHECKPOINT_DIR = "checkpoints"


METRICS_FILE = "metrics.jsonl"


@dataclasses.dataclass
class FinetuneResult:
    student: nn.Module  # the trained student, EMA weights loaded when EMA is on
    step: int
    history: list[dict[str, float]]
    seconds: float


def check_batch(config: TrainConfig, num_items: int, world_size: int) -> None:
    """The global batch fits the data set and splits evenly over processes and micro-batches."""
    if num_items < config.batch_size:
        raise ValueError(f"batch_size={config.batch_size} is larger than the data set ({num_items} images)")
    if config.batch_size % (world_size * config.gradient_accumulation_steps):
        raise ValueError(f"batch_size={config.batch_size} is not allowed: it must be a multiple of the number of "
                         f"processes ({world_size}) x gradient_accumulation_steps "
                         f"({config.gradient_accumulation_steps})")


def finetune(student: nn.Module, teacher: Callable[..., Any] | None, finetuner: Finetuner, dataset: Dataset,
             config: TrainConfig, output_dir: str | os.PathLike | None = None, *, resume: bool = False,
             overwrite: bool = False, runtime: Runtime | None = None, progress: bool = True,
             on_log: Callable[[dict[str, float]], None] | None = None) -> FinetuneResult:
    """Finetune ``student`` against a frozen ``teacher`` with ``finetuner`` on ``dataset``.

    Dataset items are image tensors [C, H, W] in [-1, 1], or dicts holding the image under
    "sample" and conditioning tensors under the model's keyword names (e.g. "class_labels").
    The student is trained in place; the global torch RNG is seeded from ``config.seed``.

    With ``output_dir``, the main process writes checkpoints every ``checkpoint_every`` steps and at
    the end, and ``metrics.jsonl`` (one line per logged step, each loss term). ``resume=True``
    continues from the last complete checkpoint there; with the same seed the result equals an
    uninterrupted run, and ``seconds`` counts the time of every part. An ``output_dir`` that already
    holds a run is an error unless ``resume`` or ``overwrite`` (which deletes its checkpoints and
    metrics first). The teacher is put in eval mode and never receives gradients.
    """
    runtime = runtime or Runtime()
    if finetuner.uses_teacher and teacher is None:
        raise ValueError(f"finetuner {finetuner.name!r} needs a teacher model")
    check_batch(config, len(dataset), runtime.world_size)
    out = Path(output_dir) if output_dir is not None else None
    ckpts = Checkpoints(out / CHECKPOINT_DIR, config.keep_checkpoints) if out is not None else None
    old = [p for p in (out / CHECKPOINT_DIR, out / METRICS_FILE) if p.exists()] if out and not resume else []
    if old and not overwrite:
        raise FileExistsError(f"output_dir {str(out)!r} already holds a run ({', '.join(p.name for p in old)}); "
                              "pass resume=True to continue it or overwrite=True to replace it")

    if runtime.world_size > 1 and getattr(finetuner, "mode", None) == "jvp":
        raise ValueError("mode='jvp' is not allowed with several processes (torch.func.jvp cannot run through "
                         "DistributedDataParallel); allowed: vjp (the default), fd")
    per_process = config.batch_size // runtime.world_size
    torch.manual_seed(config.seed)
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the student has no trainable parameters (requires_grad=False everywhere)")
    dropouts = []
    if config.dropout is not None:
        dropouts = [m for name, m in student.named_modules() if name.rsplit(".", 1)[-1] == "dropout"
                    and isinstance(m, nn.Dropout)]
        if not dropouts:
            raise ValueError(f"dropout={config.dropout} is not allowed for this student: it has no residual-block "
                             "dropout (nn.Dropout modules named 'dropout'); use null")
    if config.gradient_checkpointing:
        if not getattr(student, "_supports_gradient_checkpointing", False):
            raise ValueError(f"gradient_checkpointing=True is not allowed for {type(student).__name__}: it has no "
                             "gradient checkpointing; use false")
        if getattr(getattr(finetuner, "opts", None), "mode", None) == "jvp":
            raise ValueError("gradient_checkpointing=True is not allowed with mode 'jvp' (forward mode cannot go "
                             "through a recomputation); use mode vjp or fd")
    if old and runtime.is_main:  # every check passed: the run being replaced goes now
        for p in old:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    runtime.barrier()
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    net = runtime.prepare(student, teacher)  # what the loop calls: the student, or its DDP wrapper
    model = runtime.unwrap(net)
    ema = [p.detach().clone() for p in params] if config.ema_decay else []
    start, history, nonfinite, seconds_before = 0, [], 0, 0.0
    micro_batches = runtime.local_positions(config.batch_size).split(per_process // config.gradient_accumulation_steps)
    autocast = torch.autocast(runtime.device.type, dtype=torch.bfloat16, enabled=config.mixed_precision == "bf16")

    if resume:
        latest = ckpts.latest() if ckpts is not None else None
        if latest is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint under {out / CHECKPOINT_DIR if out else None}")
        tensors = load_tensors(latest / "state.safetensors")
        meta = json.loads((latest / "state.json").read_text())
        model.load_state_dict({k[len("student."):]: v for k, v in tensors.items() if k.startswith("student.")})
        for i, e in enumerate(ema):
            e.copy_(tensors[f"ema.{i}"])
        load_optimizer_state(optimizer, tensors, meta["optimizer"])
        torch.set_rng_state(tensors["rng.cpu"])
        if torch.cuda.is_available() and "rng.cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda"], runtime.device)
        start, history = meta["step"], [h for h in meta["history"] if h["step"] <= meta["step"]]
        seconds_before = meta.get("seconds", history[-1]["seconds"] if history else 0.0)
        logger.info("resumed from %s at step %d", latest, start)

    def checkpoint(step: int) -> None:
        if ckpts is None or not runtime.is_main:
            return
        tensors = {f"student.{k}": v for k, v in model.state_dict().items()}
        tensors.update({f"ema.{i}": e for i, e in enumerate(ema)})
        opt_tensors, opt_meta = optimizer_state(optimizer)
        tensors.update(opt_tensors)
        tensors["rng.cpu"] = torch.get_rng_state()
        if runtime.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(runtime.device)
        meta = {"step": step, "seconds": time.perf_counter() - began, "optimizer": opt_meta, "history": history,
                "finetuner": finetuner.name,
                "finetuner_options": finetuner.options(),
                "train_config": config.model_dump()}
        ckpts.save(step, tensors, meta)
        lines = "".join(json.dumps(h) + "\n" for h in history)
        atomic_write_text(out / METRICS_FILE, lines)

    restore = contextlib.ExitStack()  # the teacher is frozen and in eval mode for the run only
    restore.enter_context(requires_grad(teacher, False))
    if isinstance(teacher, nn.Module):
        restore.callback(teacher.train, teacher.training)
        teacher.eval()
    for m in dropouts:  # the run's dropout, restored when it ends
        restore.callback(setattr, m, "p", m.p)
        m.p = config.dropout
    if config.gradient_checkpointing and not student.is_gradient_checkpointing:  # for the run only
        student.enable_gradient_checkpointing(checkpoint_as_forward)
        restore.callback(student.disable_gradient_checkpointing)
    student.train()
    began = time.perf_counter() - seconds_before  # the wall time of the parts before a resume counts
    bar = None
    if progress and runtime.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=start, desc=f"finetune[{finetuner.name}]", dynamic_ncols=True)
    try:
        for step in range(start, config.steps):
            # every random draw is for the global batch, the same on every process
            indices = batch_indices(step, len(dataset), config.batch_size, config.seed)
            flip = torch.rand(config.batch_size) < 0.5 if config.hflip else None
            drop_rate = getattr(dataset, "caption_dropout", 0.0)  # text-to-image data (encoding.EncodedDataset)
            drop = torch.rand(config.batch_size) < drop_rate if drop_rate else None
            noise = timesteps = None
            lr = config.lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            sums: dict[str, float] = {}
            for i, pos in enumerate(micro_batches):
                x0, model_kwargs = collate([dataset[int(j)] for j in indices[pos]], runtime.device)
                if drop is not None:
                    model_kwargs = dataset.drop_captions(model_kwargs, drop[pos])
                if noise is None:  # drawn once the image shape is known
                    noise = torch.randn(config.batch_size, *x0.shape[1:])
                    timesteps = sample_timesteps(config.batch_size, finetuner.num_train_timesteps, config.antithetic)
                if flip is not None:
                    x0 = torch.where(flip[pos].view(-1, 1, 1, 1).to(x0.device), x0.flip(-1), x0)
                with runtime.sync_gradients(net, sync=i == len(micro_batches) - 1):
                    with autocast, finetuner_rng(config.seed, step, runtime.rank, i, runtime.device):
                        loss, terms = finetuner.loss(net, teacher, x0, noise[pos].to(runtime.device),
                                                     timesteps[pos].to(runtime.device), **model_kwargs)
                    runtime.backward(loss / len(micro_batches))
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + v / len(micro_batches)
            # the step's terms, averaged over processes: every process takes the same decision below
            terms = dict(zip(sums, runtime.mean(torch.tensor(list(sums.values()), dtype=torch.float64)).tolist()))
            if not math.isfinite(terms["loss"]):
                optimizer.zero_grad(set_to_none=True)
                nonfinite += 1
                bad = [k for k, v in terms.items() if k != "loss" and not math.isfinite(v)]
                logger.warning("step %d: non-finite loss terms %s at timesteps %s; step skipped",
                               step, bad, timesteps.tolist())
                if nonfinite >= config.max_nonfinite_steps:
                    raise NonFiniteLossError(
                        f"{nonfinite} consecutive steps with a non-finite loss; last at step {step}, "
                        f"term(s) {', '.join(bad)}, timesteps {timesteps.tolist()}; "
                        "the last good checkpoint is kept")
                continue
            nonfinite = 0
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            if ema:
                decay = min(config.ema_decay, (1 + step) / (10 + step))
                with torch.no_grad():
                    torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - decay)

            done = step + 1
            if done % config.log_every == 0 or done == config.steps:
                record = {"step": done, "lr": lr, "seconds": time.perf_counter() - began, **terms}
                history.append(record)
                if on_log is not None:
                    on_log(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{v:.4g}" for k, v in terms.items()}, refresh=False)
            if done % config.checkpoint_every == 0 or done == config.steps:
                checkpoint(done)
    finally:
        if bar is not None:
            bar.close()
        restore.close()

    if ema:
        with torch.no_grad():
            for p, e in zip(params, ema):
                p.copy_(e)
    return FinetuneResult(student=model, step=config.steps, history=history,
                          seconds=time.perf_counter() - began)
