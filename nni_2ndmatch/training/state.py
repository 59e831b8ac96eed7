"""What a finetune carries from step to step, and what a checkpoint holds: the weights, the
optimizer, the EMA of the weights, the loop's random generator, the step and the logged history.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator

import torch
from torch import Tensor, nn

from ..compat import lerp_all_
from ..scoped import seeded_generator
from .checkpoints import load_optimizer_state, optimizer_state
from .options import TrainConfig


class EMA:
    """An exponential moving average of parameters (the shape of diffusers' ``EMAModel``): after
    optimisation step s (counted from 0), shadow += (1 - d) (param - shadow) with
    d = min(decay, (1 + s) / (10 + s)), a warm-up that lets early steps count."""

    def __init__(self, parameters: Iterable[Tensor], decay: float) -> None:
        self.decay = decay
        self.shadow = [p.detach().clone() for p in parameters]

    @torch.no_grad()
    def follow(self, parameters: Iterable[Tensor]) -> None:
        """The shadow on its parameters' devices and dtypes (after a runtime moved them)."""
        self.shadow = [e.to(p) for e, p in zip(self.shadow, parameters)]

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def step(self, parameters: Iterable[Tensor], step: int) -> None:
        lerp_all_(self.shadow, [p.detach() for p in parameters], 1.0 - self.decay_at(step))

    @torch.no_grad()
    def copy_to(self, parameters: Iterable[Tensor]) -> None:
        for p, e in zip(parameters, self.shadow):
            p.copy_(e)

    @contextlib.contextmanager
    def applied(self, parameters: list[Tensor]) -> Iterator[None]:
        """The EMA weights in ``parameters`` for the block; the trained ones back afterwards."""
        with torch.no_grad():
            trained = [p.detach().clone() for p in parameters]
            self.copy_to(parameters)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, t in zip(parameters, trained):
                    p.copy_(t)

    def state_dict(self) -> dict[str, Tensor]:
        return {f"ema.{i}": e for i, e in enumerate(self.shadow)}

    @torch.no_grad()
    def load_state_dict(self, tensors: dict[str, Tensor]) -> None:
        for i, e in enumerate(self.shadow):
            e.copy_(tensors[f"ema.{i}"])


class TrainState:
    """The state of a finetune: ``model`` (the student, unwrapped) and its trainable ``params``,
    AdamW over them, their EMA (when ``config.ema_decay``), the generator every random draw of the
    loop comes from (seeded with ``config.seed``), the number of steps done, the logged history
    and the seconds spent before this process started (a resumed run counts every part), of which
    ``overhead`` went to validation grids and checkpoints; ``process_seconds``: the training seconds
    of those parts times each part's number of processes (None: a checkpoint from before it was
    recorded)."""

    def __init__(self, model: nn.Module, params: list[Tensor], config: TrainConfig) -> None:
        self.model, self.params = model, params
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.ema = EMA(params, config.ema_decay) if config.ema_decay else None
        self.generator = seeded_generator(config.seed)
        self.step, self.history, self.seconds, self.overhead = 0, [], 0.0, 0.0
        self.process_seconds: float | None = 0.0

    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """(tensors, JSON-able values) of a checkpoint."""
        tensors = {f"student.{k}": v for k, v in self.model.state_dict().items()}
        tensors.update(self.ema.state_dict() if self.ema is not None else {})
        opt_tensors, opt_meta = optimizer_state(self.optimizer)
        tensors.update(opt_tensors)
        tensors["rng.loop"] = self.generator.get_state()
        return tensors, {"step": self.step, "seconds": self.seconds, "overhead_seconds": self.overhead,
                         "process_seconds": self.process_seconds, "optimizer": opt_meta, "history": self.history}

    def load_state_dict(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        self.model.load_state_dict({k[len("student."):]: v for k, v in tensors.items() if k.startswith("student.")})
        if self.ema is not None:
            self.ema.load_state_dict(tensors)
        load_optimizer_state(self.optimizer, tensors, meta["optimizer"])
        self.generator.set_state(tensors["rng.loop"] if "rng.loop" in tensors else tensors["rng.cpu"])  # (older runs)
        self.step = meta["step"]
        self.history = [h for h in meta["history"] if h["step"] <= self.step]
        self.seconds = meta.get("seconds", self.history[-1]["seconds"] if self.history else 0.0)
        self.overhead = meta.get("overhead_seconds", 0.0)
        self.process_seconds = meta.get("process_seconds")
