"""The finetuning loop: seeded, resumable, with EMA, atomic checkpoints and per-term logs.

Device placement, gradient synchronisation and "only the main process writes" all live in
``Runtime``; a multi-process runtime (Hugging Face Accelerate) can replace it without touching
the loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
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
METRICS_FILE = "metrics.jsonl"


class NonFiniteLossError(RuntimeError):
    """Raised after too many steps with a non-finite loss; the last good checkpoint is kept."""


class TrainConfig(BaseModel):
    """Options of the finetuning loop (reference recipe: Adam lr 2e-4, constant, clip 1.0, EMA 0.9999).

    Also the training part of a config file's ``finetune`` section; bad values raise a
    ``pydantic.ValidationError`` (a ValueError) naming the field, the value and the allowed range.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(200, ge=1, description="optimisation steps")
    batch_size: int = Field(16, ge=1, description="global batch size (all processes, all accumulation steps)")
    gradient_accumulation_steps: int = Field(1, ge=1, description="micro-batches per optimisation step")
    mixed_precision: Literal["no", "bf16"] = "no"  # autocast for the network passes; the Jacobian term stays fp32
    lr: float = Field(2e-4, gt=0, lt=1)
    weight_decay: float = Field(0.0, ge=0, lt=1)
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"  # decays to 0 after warm-up
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0, description="max global grad norm; null: no clipping")
    ema_decay: float | None = Field(0.9999, gt=0, lt=1, description="min(ema_decay, (1+s)/(10+s)); null: no EMA")
    antithetic: bool = True  # timesteps t and T-1-t in pairs
    hflip: bool = False  # random horizontal flips
    dropout: float | None = Field(None, ge=0, lt=1, description="p of the student's residual-block dropout (nn.Dropout "
                                  "modules named 'dropout', as in diffusers' ResnetBlock2D) during the run; the "
                                  "reference: 0.1; null: as the model has it")
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
    """Single-process runtime: where tensors live, how gradients are made, who may write files.

    ``AccelerateRuntime`` (nni_2ndmatch.distributed) is the multi-process one. The loop draws every
    random number for the whole global batch on every process (the same draws, from the same seed)
    and each process takes its share with ``local_positions``; so the data, noise and timesteps of
    a step do not depend on the number of processes.
    """

    rank, world_size = 0, 1

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def prepare(self, student: nn.Module, teacher: Any) -> nn.Module:
        """Move the models; return the student the loop calls (a wrapper, in a multi-process runtime)."""
        student.to(self.device)
        if isinstance(teacher, nn.Module):
            teacher.to(self.device)
        return student

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def sync_gradients(self, model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        """Around a micro-batch's forward and backward: ``sync=False`` accumulates gradients
        without synchronising processes (all micro-batches of a step but the last)."""
        return contextlib.nullcontext()

    def mean(self, values: Tensor) -> Tensor:
        """The mean over processes of a tensor every process holds."""
        return values

    def barrier(self) -> None:
        """Wait until every process gets here."""

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model

    def local_positions(self, batch: int) -> Tensor:
        """Positions in a global batch that belong to this process."""
        return torch.arange(batch)[self.rank::self.world_size]


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


@contextlib.contextmanager
def _finetuner_rng(seed: int, step: int, rank: int, micro_batch: int, device: torch.device):
    """The finetuner's own draws (Jacobian directions, dropout masks) come from a generator seeded
    by (seed, step, process, micro-batch) and leave the loop's stream untouched: the data order,
    noise and timesteps of every step then do not depend on how the batch is split, and processes
    draw independently of each other."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        digest = hashlib.blake2b(f"{seed}/{step}/{rank}/{micro_batch}".encode(), digest_size=8).digest()
        torch.manual_seed(int.from_bytes(digest, "little") >> 1)
        yield


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
    if len(dataset) < config.batch_size:
        raise ValueError(f"batch_size={config.batch_size} is larger than the data set ({len(dataset)} images)")
    out = Path(output_dir) if output_dir is not None else None
    ckpts = _Checkpoints(out / CHECKPOINT_DIR, config.keep_checkpoints) if out is not None else None
    if out is not None and not resume and runtime.is_main:
        old = [p for p in (out / CHECKPOINT_DIR, out / METRICS_FILE) if p.exists()]
        if old and not overwrite:
            raise FileExistsError(f"output_dir {str(out)!r} already holds a run ({', '.join(p.name for p in old)}); "
                                  "pass resume=True to continue it or overwrite=True to replace it")
        for p in old:
            shutil.rmtree(p) if p.is_dir() else p.unlink()

    if runtime.world_size > 1 and getattr(finetuner, "mode", None) == "jvp":
        raise ValueError("mode='jvp' is not allowed with several processes (torch.func.jvp cannot run through "
                         "DistributedDataParallel); allowed: vjp (the default), fd")
    per_process = config.batch_size // runtime.world_size
    if config.batch_size % (runtime.world_size * config.gradient_accumulation_steps):
        raise ValueError(f"batch_size={config.batch_size} is not allowed: it must be a multiple of the number of "
                         f"processes ({runtime.world_size}) x gradient_accumulation_steps "
                         f"({config.gradient_accumulation_steps})")
    torch.manual_seed(config.seed)
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the student has no trainable parameters (requires_grad=False everywhere)")
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
        _load_optimizer_state(optimizer, tensors, meta["optimizer"])
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
        opt_tensors, opt_meta = _optimizer_state(optimizer)
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

    dropouts = []
    if config.dropout is not None:
        dropouts = [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] == "dropout"
                    and isinstance(m, nn.Dropout)]
        if not dropouts:
            raise ValueError(f"dropout={config.dropout} is not allowed for this student: it has no residual-block "
                             "dropout (nn.Dropout modules named 'dropout'); use null")
    restore = contextlib.ExitStack()  # the teacher is frozen and in eval mode for the run only
    restore.enter_context(requires_grad(teacher, False))
    if isinstance(teacher, nn.Module):
        restore.callback(teacher.train, teacher.training)
        teacher.eval()
    for m in dropouts:  # the run's dropout, restored when it ends
        restore.callback(setattr, m, "p", m.p)
        m.p = config.dropout
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
            noise = timesteps = None
            lr = config.lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            sums: dict[str, float] = {}
            for i, pos in enumerate(micro_batches):
                x0, model_kwargs = collate([dataset[int(j)] for j in indices[pos]], runtime.device)
                if noise is None:  # drawn once the image shape is known
                    noise = torch.randn(config.batch_size, *x0.shape[1:])
                    timesteps = sample_timesteps(config.batch_size, finetuner.num_train_timesteps, config.antithetic)
                if flip is not None:
                    x0 = torch.where(flip[pos].view(-1, 1, 1, 1).to(x0.device), x0.flip(-1), x0)
                with runtime.sync_gradients(net, sync=i == len(micro_batches) - 1):
                    with autocast, _finetuner_rng(config.seed, step, runtime.rank, i, runtime.device):
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
