"""The finetuning loop: seeded, resumable, with EMA, atomic checkpoints and per-term logs.

Its parts each own one thing: ``TrainState`` (training.state) what a checkpoint holds; the batch
stream (``data.batch_loader``) the order and reading of the data, in worker processes; ``draw_step``
every random number of a step; ``optimization_step`` one step's forward, backward and update; and
``finetune`` their order. Device placement, gradient synchronisation and "only the main process
writes" live in ``Runtime``; a multi-process runtime (Hugging Face Accelerate) can replace it
without touching the loop.
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
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..compat import supports_gradient_checkpointing
from ..data import StepBatches, batch_loader, collate
from ..errors import NonFiniteLossError
from ..files import atomic_write_text, load_tensors
from ..finetuners import Finetuner, jac_every_refusal, schedule_refusal
from ..layout import CHECKPOINT_DIR, CHECKPOINT_META, CHECKPOINT_TENSORS, METRICS_FILE, RUN_MARKERS
from ..method import checkpoint_as_forward, sample_timesteps
from ..scoped import text_seed
from ..utils import requires_grad
from .checkpoints import Checkpoints
from .options import TrainConfig, checkpointing_refusal
from .runtime import Runtime, finetuner_rng
from .state import TrainState

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Validation:
    """What the loop calls every ``every`` steps (and after the last): ``call(step, student)``."""

    every: int
    call: Callable[[int, nn.Module], None]


@dataclasses.dataclass(frozen=True)
class Watch:
    """What follows a run as it goes: a progress bar and ``validation`` in the main process, and
    ``on_log`` called in every process with each logged record (the line metrics.jsonl gets).
    With several processes each one passes a ``validation`` of the same ``every`` (or none): the
    others wait while the main one calls it."""

    progress: bool = True
    on_log: Callable[[dict[str, float]], None] | None = None
    validation: Validation | None = None


@dataclasses.dataclass
class FinetuneResult:
    student: nn.Module  # the trained student, EMA weights loaded when EMA is on
    step: int
    history: list[dict[str, float]]
    seconds: float
    overhead_seconds: float = 0.0  # of ``seconds``: validation grids and checkpoints (what training alone does not do)
    process_seconds: float | None = None  # training seconds times processes, each part of a resumed run by its own


def check_batch(config: TrainConfig, num_items: int, world_size: int) -> None:
    """The global batch fits the data set and splits evenly over processes and micro-batches."""
    if num_items < config.batch_size:
        raise ValueError(f"batch_size={config.batch_size} is larger than the data set ({num_items} images)")
    if config.batch_size % (world_size * config.gradient_accumulation_steps):
        raise ValueError(f"batch_size={config.batch_size} is not allowed: it must be a multiple of the number of "
                         f"processes ({world_size}) x gradient_accumulation_steps "
                         f"({config.gradient_accumulation_steps})")


def run_dropouts(student: nn.Module, config: TrainConfig) -> list[nn.Dropout]:
    """The residual-block dropouts ``config.dropout`` sets for the run (none when it is null)."""
    if config.dropout is None:
        return []
    dropouts = [m for name, m in student.named_modules() if name.rsplit(".", 1)[-1] == "dropout"
                and isinstance(m, nn.Dropout)]
    if not dropouts:
        raise ValueError(f"dropout={config.dropout} is not allowed for this student: it has no residual-block "
                         "dropout (nn.Dropout modules named 'dropout'); use null")
    return dropouts


def check_student_options(student: nn.Module, config: TrainConfig) -> None:
    """The loop options that need something of the student's class: dropout layers for ``dropout``,
    gradient checkpointing for ``gradient_checkpointing`` (a pruned student has its teacher's)."""
    run_dropouts(student, config)
    if config.gradient_checkpointing and not supports_gradient_checkpointing(student):
        raise ValueError(f"gradient_checkpointing=True is not allowed for {type(student).__name__}: it has no "
                         "gradient checkpointing; use false")


def check_run(student: nn.Module, teacher: Any, finetuner: Finetuner, dataset: Dataset, config: TrainConfig,
              runtime: Runtime) -> None:
    """Everything a finetune needs, checked before anything is written or deleted."""
    if finetuner.uses_teacher and teacher is None:
        raise ValueError(f"finetuner {finetuner.name!r} needs a teacher model")
    check_batch(config, len(dataset), runtime.world_size)
    mode = getattr(getattr(finetuner, "opts", None), "mode", None)
    if runtime.world_size > 1 and mode == "jvp":
        raise ValueError("mode='jvp' is not allowed with several processes (torch.func.jvp cannot run through "
                         "DistributedDataParallel); allowed: auto (the default), vjp, fd")
    if not any(p.requires_grad for p in student.parameters()):
        raise ValueError("the student has no trainable parameters (requires_grad=False everywhere)")
    check_student_options(student, config)
    check_finetuner(finetuner, config)


def check_finetuner(finetuner: Finetuner, config: TrainConfig) -> None:
    """The strategy's options against the loop's (and its scheduler): a ValueError names the option
    that would do nothing in this run."""
    refusal = checkpointing_refusal(config.gradient_checkpointing, getattr(finetuner.opts, "mode", None))
    if refusal:
        raise ValueError(f"gradient_checkpointing=True is not allowed {refusal}")
    for option, refusal in (("jac_every", jac_every_refusal(getattr(finetuner.opts, "jac_every", 1), config.steps)),
                            ("jac_min_timestep", schedule_refusal(finetuner))):
        if refusal:
            raise ValueError(f"{option}={getattr(finetuner.opts, option)!r} is not allowed: {refusal}")


def check_same_run(runtime: Runtime, finetuner: Finetuner, config: TrainConfig, output_dir: Any, resume: bool,
                   overwrite: bool, watch: Watch) -> None:
    """Every process of a multi-process run must be given the same run: the main process alone writes
    checkpoints and validates, but every process takes part in each (``Runtime.on_main``), so a
    process told otherwise would wait in the wrong collective."""
    every = watch.validation.every if watch.validation is not None else 0
    run = json.dumps([config.model_dump(exclude={"num_workers"}), finetuner.name])  # (how data are read may differ)
    digest = text_seed(run)
    if not runtime.same_on_every_process((digest, every, output_dir is not None, resume, overwrite)):
        raise ValueError(f"every process must be given the same config, finetuner, output_dir (or none), resume, "
                         f"overwrite and watch.validation schedule; they differ between the {runtime.world_size} "
                         f"processes (this one, rank {runtime.rank}: output_dir={output_dir!r}, resume={resume}, "
                         f"overwrite={overwrite}, validation every {every} steps)")


@contextlib.contextmanager
def run_settings(student: nn.Module, teacher: Any, config: TrainConfig) -> Iterator[None]:
    """For the run only: the teacher frozen in eval mode, the student in train mode with the run's
    dropout and gradient checkpointing; all restored when it ends, also on error."""
    with contextlib.ExitStack() as restore:
        restore.enter_context(requires_grad(teacher, False))
        if isinstance(teacher, nn.Module):
            restore.callback(teacher.train, teacher.training)
            teacher.eval()
        for m in run_dropouts(student, config):
            restore.callback(setattr, m, "p", m.p)
            m.p = config.dropout
        if config.gradient_checkpointing and not student.is_gradient_checkpointing:
            student.enable_gradient_checkpointing(checkpoint_as_forward)
            restore.callback(student.disable_gradient_checkpointing)
        restore.callback(student.train, student.training)
        student.train()
        yield


@dataclasses.dataclass
class StepDraws:
    """Every random number of one step, drawn for the global batch (the same on every process,
    whatever the split): flips, caption drops, noise and timesteps, in that order."""

    flip: Tensor | None
    drop: Tensor | None
    noise: Tensor
    timesteps: Tensor


def draw_step(generator: torch.Generator, config: TrainConfig, image_shape: torch.Size, num_train_timesteps: int,
              caption_dropout: float) -> StepDraws:
    batch = config.batch_size
    flip = torch.rand(batch, generator=generator) < 0.5 if config.hflip else None
    drop = torch.rand(batch, generator=generator) < caption_dropout if caption_dropout else None
    noise = torch.randn(batch, *image_shape, generator=generator)
    timesteps = sample_timesteps(batch, num_train_timesteps, config.antithetic, generator, config.timestep_density,
                                 config.logit_mean, config.logit_std)
    return StepDraws(flip, drop, noise, timesteps)


def optimization_step(net: nn.Module, teacher: Any, finetuner: Finetuner, dataset: Dataset,
                      micro_batches: list[tuple[Tensor, dict[str, Tensor]]], positions: list[Tensor],
                      state: TrainState, config: TrainConfig, runtime: Runtime) -> tuple[dict[str, float], StepDraws]:
    """One step: the loss of every micro-batch, backward, and (when the loss is finite) the
    clipped update and the EMA. Returns the step's terms, averaged over processes, with the
    gradient's norm (before clipping) when the step was applied, and its draws."""
    draws = draw_step(state.generator, config, micro_batches[0][0].shape[1:], finetuner.num_train_timesteps,
                      getattr(dataset, "caption_dropout", 0.0))
    finetuner.step = state.step  # what jac_every reads: a function of the step, so resumes are exact
    lr = config.lr_at(state.step)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    state.optimizer.zero_grad(set_to_none=True)
    autocast = torch.autocast(runtime.device.type, dtype=torch.bfloat16, enabled=config.mixed_precision == "bf16")
    sums: dict[str, float] = {}
    for i, ((x0, model_kwargs), pos) in enumerate(zip(micro_batches, positions)):
        if draws.drop is not None:
            model_kwargs = dataset.drop_captions(model_kwargs, draws.drop[pos])
        if draws.flip is not None:
            x0 = torch.where(draws.flip[pos].view(-1, 1, 1, 1), x0.flip(-1), x0)
        x0 = x0.to(runtime.device, non_blocking=True)
        model_kwargs = {k: v.to(runtime.device, non_blocking=True) for k, v in model_kwargs.items()}
        with runtime.sync_gradients(net, sync=i == len(micro_batches) - 1):
            with autocast, finetuner_rng(config.seed, state.step, runtime.rank, i, runtime.device):
                loss, terms = finetuner.loss(net, teacher, x0, draws.noise[pos].to(runtime.device),
                                             draws.timesteps[pos].to(runtime.device), **model_kwargs)
            runtime.backward(loss / len(micro_batches))
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v / len(micro_batches)
    # averaged over processes: every process takes the same decision below
    terms = dict(zip(sums, runtime.mean(torch.tensor(list(sums.values()), dtype=torch.float64)).tolist()))
    if math.isfinite(terms["loss"]):  # the norm before clipping (synchronised gradients: the same everywhere)
        norm = torch.nn.utils.get_total_norm([p.grad for p in state.params if p.grad is not None])
        terms["grad_norm"] = float(norm)
    if math.isfinite(terms["loss"]) and math.isfinite(terms["grad_norm"]):
        if config.grad_clip is not None:
            torch.nn.utils.clip_grads_with_norm_(state.params, config.grad_clip, norm)
        state.optimizer.step()
        if state.ema is not None:
            state.ema.step(state.params, state.step)
    else:
        state.optimizer.zero_grad(set_to_none=True)
    return terms, draws


def _output_dir(output_dir: str | os.PathLike | None, config: TrainConfig, resume: bool,
                overwrite: bool) -> tuple[Path | None, Checkpoints | None, list[Path]]:
    """The run's folder, its checkpoints, and what an ``overwrite`` deletes (after every check)."""
    if output_dir is None:
        return None, None, []
    if resume and overwrite:
        raise ValueError("resume=True and overwrite=True: continue the run in output_dir or replace it, not both")
    out = Path(output_dir)
    old = [out / name for name in RUN_MARKERS if (out / name).exists()] if not resume else []
    if old and not overwrite:
        raise FileExistsError(f"output_dir {str(out)!r} already holds a run ({', '.join(p.name for p in old)}); "
                              "pass resume=True to continue it or overwrite=True to replace it")
    return out, Checkpoints(out / CHECKPOINT_DIR, config.keep_checkpoints), old


def _validate(validation: Validation, step: int, state: TrainState, params: list[nn.Parameter]) -> None:
    """``validation.call`` with the EMA weights in the student, in eval mode (both restored after)."""
    with state.ema.applied(params) if state.ema is not None else contextlib.nullcontext():
        state.model.eval()
        try:
            validation.call(step, state.model)
        finally:
            state.model.train()


def _remove(paths: list[Path]) -> None:
    for p in paths:
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def finetune(student: nn.Module, teacher: Callable[..., Any] | None, finetuner: Finetuner, dataset: Dataset,
             config: TrainConfig, output_dir: str | os.PathLike | None = None, *, resume: bool = False,
             overwrite: bool = False, runtime: Runtime | None = None, watch: Watch = Watch()) -> FinetuneResult:
    """Finetune ``student`` against a frozen ``teacher`` with ``finetuner`` on ``dataset``.

    Dataset items are image tensors [C, H, W] in [-1, 1], or dicts holding the image under
    "sample" and conditioning tensors under the model's keyword names (e.g. "class_labels").
    The student is trained in place. Every random number of the loop comes from one generator
    seeded with ``config.seed`` (torch's global generator is left alone); the data are read by a
    DataLoader with ``config.num_workers`` worker processes, in an order that depends on the seed
    and step only.

    With ``output_dir``, the main process writes checkpoints every ``checkpoint_every`` steps and at
    the end, and ``metrics.jsonl`` (one line per logged step, each loss term). ``resume=True``
    continues from the last complete checkpoint there; with the same seed the result equals an
    uninterrupted run, and ``seconds`` counts the time of every part. An ``output_dir`` that already
    holds a run is an error unless ``resume`` or ``overwrite`` (which deletes its checkpoints,
    metrics and summary first). The teacher is put in eval mode and never receives gradients.

    ``watch.validation``: every ``validation.every`` steps and after the last, the main process calls
    ``validation.call(step, student)`` with the EMA weights in the student (eval mode; the trained
    weights and train mode are back afterwards). It draws no random number of the loop's.

    With several processes (``runtime``), every process is given the same arguments but
    ``watch.validation.call`` (only the main process's runs); the run is refused on every process
    otherwise.
    """
    runtime = runtime or Runtime()
    check_same_run(runtime, finetuner, config, output_dir, resume, overwrite, watch)
    check_run(student, teacher, finetuner, dataset, config, runtime)
    out, ckpts, old = _output_dir(output_dir, config, resume, overwrite)
    finetuner.resolve(teacher, tuple(collate([dataset[0]])[0].shape[1:]))
    runtime.on_main(lambda: _remove(old))  # every check passed: the run being replaced goes now
    params = [p for p in student.parameters() if p.requires_grad]
    state = TrainState(student, params, config)  # the optimizer holds the parameters DDP is given next
    net = runtime.prepare(student, teacher)  # what the loop calls: the student, or its DDP wrapper
    state.model = runtime.unwrap(net)
    if state.ema is not None:  # cloned where the student was; prepare may have moved it (to a GPU)
        state.ema.follow(params)
    if resume:
        _resume(state, ckpts, out, finetuner, config)
    positions = runtime.local_positions(config.batch_size).split(
        config.batch_size // runtime.world_size // config.gradient_accumulation_steps)
    loader = batch_loader(dataset, StepBatches(len(dataset), config.batch_size, config.seed, state.step, config.steps,
                                               list(positions)),
                          config.seed, config.num_workers, pin_memory=runtime.device.type == "cuda")
    began = time.perf_counter() - state.seconds  # the wall time of the parts before a resume counts
    if state.process_seconds is None:  # a checkpoint from before they were recorded: its parts as this one
        state.process_seconds = (state.seconds - state.overhead) * runtime.world_size
    before = (state.process_seconds, state.seconds - state.overhead)

    def process_seconds(seconds: float) -> float:  # this part's training seconds on each of its processes
        return before[0] + (seconds - state.overhead - before[1]) * runtime.world_size
    bar = _progress_bar(finetuner, config, state.step) if watch.progress and runtime.is_main else None
    on_log, validation = watch.on_log, watch.validation
    nonfinite = 0
    with run_settings(student, teacher, config), contextlib.closing(bar) if bar else contextlib.nullcontext():
        batches = iter(loader)
        for step in range(state.step, config.steps):
            state.step = step
            micro_batches = [next(batches) for _ in positions]
            terms, draws = optimization_step(net, teacher, finetuner, dataset, micro_batches, list(positions), state,
                                             config, runtime)
            nonfinite = 0 if math.isfinite(terms["loss"]) and math.isfinite(terms["grad_norm"]) else nonfinite + 1
            done = step + 1
            if nonfinite:
                _skipped(step, terms, draws, nonfinite, config.max_nonfinite_steps, runtime.is_main)
                if done < config.steps:
                    continue  # the last step, skipped or not, gets the run's final validation and checkpoint
            elif done % config.log_every == 0 or done == config.steps:
                record = {"step": done, "lr": config.lr_at(step), "seconds": time.perf_counter() - began, **terms}
                state.history.append(record)
                if on_log is not None:
                    on_log(state.history[-1])
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{v:.4g}" for k, v in terms.items()}, refresh=False)
            aside = time.perf_counter()
            if validation is not None and (done % validation.every == 0 or done == config.steps):
                runtime.on_main(lambda: _validate(validation, done, state, params))
            state.overhead += time.perf_counter() - aside
            if ckpts is not None and (done % config.checkpoint_every == 0 or done == config.steps):
                aside = time.perf_counter()
                seconds = aside - began
                state.process_seconds = process_seconds(seconds)
                runtime.on_main(lambda: _checkpoint(ckpts, out, state, done, seconds, finetuner, config))
                state.overhead += time.perf_counter() - aside
    if state.ema is not None:
        state.ema.copy_to(params)
    seconds = time.perf_counter() - began
    return FinetuneResult(student=state.model, step=config.steps, history=state.history, seconds=seconds,
                          overhead_seconds=state.overhead, process_seconds=process_seconds(seconds))


def _resume(state: TrainState, ckpts: Checkpoints | None, out: Path | None, finetuner: Finetuner,
            config: TrainConfig) -> None:
    """Load the last complete checkpoint into ``state``, after checking that this run continues it:
    the same strategy and options, no loop option that changes the weights, not fewer steps."""
    if out is None:
        raise ValueError("resume=True needs the output_dir of the run to continue")
    latest = ckpts.latest() if ckpts is not None else None
    if latest is None:
        raise FileNotFoundError(f"--resume: no complete checkpoint under {out / CHECKPOINT_DIR}")
    meta = json.loads((latest / CHECKPOINT_META).read_text())
    options, saved = json.loads(json.dumps(finetuner.options())), meta.get("finetuner_options", {})
    if meta.get("finetuner") != finetuner.name:
        changed = [f"finetuner ({meta.get('finetuner')!r} -> {finetuner.name!r})"]
    else:
        changed = [f"{k} ({saved[k]!r} -> {options[k]!r})" for k in sorted(saved.keys() & options.keys())
                   if saved[k] != options[k]]
    changed += config.resume_changes(meta.get("train_config", {}))
    if changed:
        raise ValueError(f"resume: the run differs from the checkpoint's ({latest}) in {', '.join(changed)}; resume "
                         "with its settings, or start a new run (overwrite=True)")
    if config.steps < meta["step"]:
        raise ValueError(f"resume: steps={config.steps} is below the checkpoint's step {meta['step']} ({latest}); "
                         f"allowed: steps >= {meta['step']}")
    state.load_state_dict(load_tensors(latest / CHECKPOINT_TENSORS), meta)
    logger.info("resumed from %s at step %d", latest, state.step)


def _skipped(step: int, terms: dict[str, float], draws: StepDraws, count: int, limit: int, warn: bool) -> None:
    """A step skipped for a non-finite loss or gradient: a warning (``warn``: from the main process; the
    terms are the mean over processes, the same in each), or after ``limit`` in a row, the error."""
    bad = [k for k, v in terms.items() if k != "loss" and not math.isfinite(v)]
    if warn:
        logger.warning("step %d: non-finite %s at timesteps %s; step skipped", step, ", ".join(bad),
                       draws.timesteps.tolist())
    if count >= limit:
        raise NonFiniteLossError(f"{count} consecutive steps with a non-finite loss or gradient; last at step {step}, "
                                 f"term(s) {', '.join(bad)}, timesteps {draws.timesteps.tolist()}; the last good "
                                 "checkpoint is kept")


def _progress_bar(finetuner: Finetuner, config: TrainConfig, start: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=config.steps, initial=start, desc=f"finetune[{finetuner.name}]", dynamic_ncols=True)


def _checkpoint(ckpts: Checkpoints, out: Path, state: TrainState, done: int, seconds: float, finetuner: Finetuner,
                config: TrainConfig) -> None:
    """A checkpoint after ``done`` steps, and the metrics logged so far."""
    tensors, meta = state.state_dict()
    meta.update(step=done, seconds=seconds, finetuner=finetuner.name, finetuner_options=finetuner.options(),
                train_config=config.model_dump())
    ckpts.save(done, tensors, meta)
    atomic_write_text(out / METRICS_FILE, "".join(json.dumps(h) + "\n" for h in state.history))
