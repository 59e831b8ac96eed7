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
from typing import Any, Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from torch.utils.data import Dataset

from .finetuners import Finetuner
from .io import atomic_dir, atomic_write_json, atomic_write_text, load_tensors, save_tensors
from .utils import requires_grad

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"


class NonFiniteLossError(RuntimeError):
    """Raised after too many steps with a non-finite loss; the last good checkpoint is kept."""


class TrainConfig(BaseModel):
    """Options of the finetuning loop (reference recipe: Adam lr 2e-4, constant, clip 1.0, EMA 0.9999).

    Also the training part of a config file's ``finetune`` section; bad values raise a
    ``pydantic.ValidationError`` (a ValueError) naming the field, the value and the allowed range.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(200, ge=1, description="optimisation steps")
    batch_size: int = Field(16, ge=1, description="global batch size")
    lr: float = Field(2e-4, gt=0, lt=1)
    weight_decay: float = Field(0.0, ge=0, lt=1)
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"  # decays to 0 after warm-up
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0, description="max global grad norm; null: no clipping")
    ema_decay: float | None = Field(0.9999, gt=0, lt=1, description="min(ema_decay, (1+s)/(10+s)); null: no EMA")
    antithetic: bool = True  # timesteps t and T-1-t in pairs
    hflip: bool = False  # random horizontal flips
    seed: int = Field(0, ge=0)
    checkpoint_every: int = Field(100, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(10, ge=1)
    max_nonfinite_steps: int = Field(10, ge=1, description="consecutive skipped steps before the run stops")

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.lr_schedule == "constant":
            return self.lr
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        if self.lr_schedule == "linear":
            return self.lr * (1.0 - progress)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


class Runtime:
    """Single-process runtime: where tensors live, how gradients are made, who may write files."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)

    rank, world_size = 0, 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def prepare(self, student: nn.Module, teacher: Any, optimizer: torch.optim.Optimizer) -> tuple:
        student.to(self.device)
        if isinstance(teacher, nn.Module):
            teacher.to(self.device)
        return student, teacher, optimizer

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model

    def local_indices(self, indices: Tensor) -> Tensor:
        """This process's share of a global batch of dataset indices."""
        return indices[self.rank::self.world_size]


def batch_indices(step: int, num_items: int, batch_size: int, seed: int) -> Tensor:
    """Dataset indices of global batch ``step``: a fresh seeded permutation per epoch, last
    incomplete batch dropped. A pure function of its arguments, so a resumed run sees the same data."""
    per_epoch = num_items // batch_size
    epoch, j = divmod(step, per_epoch)
    perm = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[j * batch_size:(j + 1) * batch_size]


def collate(items: list[Any], device: torch.device) -> tuple[Tensor, dict[str, Tensor]]:
    """Stack data items: image tensors, or dicts with the image under "sample" and the model's
    conditioning (class_labels, encoder_hidden_states, ...) under its keyword names."""
    if isinstance(items[0], dict):
        x0 = torch.stack([item["sample"] for item in items]).to(device)
        kwargs = {k: torch.stack([torch.as_tensor(item[k]) for item in items]).to(device)
                  for k in items[0] if k != "sample"}
        return x0, kwargs
    return torch.stack(items).to(device), {}


def sample_timesteps(batch: int, num_train_timesteps: int, antithetic: bool) -> Tensor:
    if not antithetic:
        return torch.randint(0, num_train_timesteps, (batch,))
    t = torch.randint(0, num_train_timesteps, ((batch + 1) // 2,))
    return torch.cat([t, num_train_timesteps - 1 - t])[:batch]


@dataclasses.dataclass
class FinetuneResult:
    student: nn.Module  # the trained student, EMA weights loaded when EMA is on
    step: int
    history: list[dict[str, float]]
    seconds: float


class _Checkpoints:
    """``checkpoints/step-NNNNNNN/{state.safetensors,state.json}`` plus a ``latest`` pointer file."""

    def __init__(self, root: Path, keep: int) -> None:
        self.root, self.keep = root, keep

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        return path if (path / "state.json").is_file() else None

    def save(self, step: int, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        name = f"step-{step:07d}"
        with atomic_dir(self.root / name) as tmp:
            save_tensors(tmp / "state.safetensors", tensors)
            atomic_write_json(tmp / "state.json", meta)
        atomic_write_text(self.root / "latest", name + "\n")
        for old in sorted(self.root.glob("step-*"))[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)


def _optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def finetune(student: nn.Module, teacher: Callable[..., Any] | None, finetuner: Finetuner, dataset: Dataset,
             config: TrainConfig, output_dir: str | os.PathLike | None = None, *, resume: bool = False,
             runtime: Runtime | None = None, progress: bool = True,
             on_log: Callable[[dict[str, float]], None] | None = None) -> FinetuneResult:
    """Finetune ``student`` against a frozen ``teacher`` with ``finetuner`` on ``dataset``.

    Dataset items are image tensors [C, H, W] in [-1, 1], or dicts holding the image under
    "sample" and conditioning tensors under the model's keyword names (e.g. "class_labels").
    The student is trained in place; the global torch RNG is seeded from ``config.seed``.

    With ``output_dir``, the main process writes checkpoints every ``checkpoint_every`` steps and at
    the end, and ``metrics.jsonl`` (one line per logged step, each loss term). ``resume=True``
    continues from the last complete checkpoint there; with the same seed the result equals an
    uninterrupted run. The teacher is put in eval mode and never receives gradients.
    """
    runtime = runtime or Runtime()
    if finetuner.uses_teacher and teacher is None:
        raise ValueError(f"finetuner {finetuner.name!r} needs a teacher model")
    if len(dataset) < config.batch_size:
        raise ValueError(f"batch_size={config.batch_size} is larger than the data set ({len(dataset)} images)")
    out = Path(output_dir) if output_dir is not None else None
    ckpts = _Checkpoints(out / CHECKPOINT_DIR, config.keep_checkpoints) if out is not None else None

    torch.manual_seed(config.seed)
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the student has no trainable parameters (requires_grad=False everywhere)")
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    student, teacher, optimizer = runtime.prepare(student, teacher, optimizer)
    model = runtime.unwrap(student)
    ema = [p.detach().clone() for p in params] if config.ema_decay else []
    start, history, nonfinite = 0, [], 0

    if resume:
        latest = ckpts.latest() if ckpts is not None else None
        if latest is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint under {out / CHECKPOINT_DIR if out else None}")
        tensors = load_tensors(latest / "state.safetensors")
        meta = json.loads((latest / "state.json").read_text())
        model.load_state_dict({k[len("student."):]: v for k, v in tensors.items() if k.startswith("student.")})
        for i, e in enumerate(ema):
            e.copy_(tensors[f"ema.{i}"])
        _load_optimizer_state(optimizer, tensors, meta["optimizer"])
        torch.set_rng_state(tensors["rng.cpu"])
        if torch.cuda.is_available() and "rng.cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda"], runtime.device)
        start, history = meta["step"], [h for h in meta["history"] if h["step"] <= meta["step"]]
        logger.info("resumed from %s at step %d", latest, start)

    def checkpoint(step: int) -> None:
        if ckpts is None or not runtime.is_main:
            return
        tensors = {f"student.{k}": v for k, v in model.state_dict().items()}
        tensors.update({f"ema.{i}": e for i, e in enumerate(ema)})
        opt_tensors, opt_meta = _optimizer_state(optimizer)
        tensors.update(opt_tensors)
        tensors["rng.cpu"] = torch.get_rng_state()
        if runtime.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(runtime.device)
        meta = {"step": step, "optimizer": opt_meta, "history": history, "finetuner": finetuner.name,
                "finetuner_options": finetuner.options(),
                "train_config": config.model_dump()}
        ckpts.save(step, tensors, meta)
        lines = "".join(json.dumps(h) + "\n" for h in history)
        atomic_write_text(out / "metrics.jsonl", lines)

    teacher_state = contextlib.ExitStack()  # the teacher is frozen and in eval mode for the run only
    teacher_state.enter_context(requires_grad(teacher, False))
    if isinstance(teacher, nn.Module):
        teacher_state.callback(teacher.train, teacher.training)
        teacher.eval()
    student.train()
    began = time.perf_counter()
    bar = None
    if progress and runtime.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=start, desc=f"finetune[{finetuner.name}]", dynamic_ncols=True)
    try:
        for step in range(start, config.steps):
            idx = runtime.local_indices(batch_indices(step, len(dataset), config.batch_size, config.seed))
            x0, model_kwargs = collate([dataset[int(i)] for i in idx], runtime.device)
            if config.hflip:
                flip = torch.rand(x0.shape[0]) < 0.5
                x0 = torch.where(flip.view(-1, 1, 1, 1).to(x0.device), x0.flip(-1), x0)
            noise = torch.randn(x0.shape).to(runtime.device)
            timesteps = sample_timesteps(x0.shape[0], finetuner.num_train_timesteps, config.antithetic)
            timesteps = timesteps.to(runtime.device)
            lr = config.lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr

            loss, terms = finetuner.loss(student, teacher, x0, noise, timesteps, **model_kwargs)
            optimizer.zero_grad(set_to_none=True)
            if not math.isfinite(terms["loss"]):
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
            runtime.backward(loss)
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
        teacher_state.close()

    if ema:
        with torch.no_grad():
            for p, e in zip(params, ema):
                p.copy_(e)
    return FinetuneResult(student=model, step=config.steps, history=history,
                          seconds=time.perf_counter() - began)
