"""Where tensors live, how gradients are made and who may write files (one process); and the
finetuner's own random stream.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from ..scoped import seeded, text_seed

T = TypeVar("T")


class Runtime:
    """Single-process runtime: where tensors live, how gradients are made, who may write files.

    ``AccelerateRuntime`` (nni_2ndmatch.training.accelerate) is the multi-process one. The loop draws every
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

    def same_on_every_process(self, values: tuple[int, ...]) -> bool:
        """Whether every process holds these ``values``; the same answer on every process."""
        return True

    def on_main(self, work: Callable[[], T]) -> T | None:
        """``work()`` on the main process (what only it does: checks of the output folder, writing
        files) once every process has got here, the others waiting for it; its result there, None
        elsewhere. When it raises, the main process raises that error and every other process
        ``MainProcessFailed`` with its exit code, so that all of them stop at once and the error is
        reported once."""
        return work() if self.is_main else None

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model

    def local_positions(self, batch: int) -> Tensor:
        """Positions in a global batch that belong to this process."""
        return torch.arange(batch)[self.rank::self.world_size]


def finetuner_rng(seed: int, step: int, rank: int, micro_batch: int,
                  device: torch.device) -> contextlib.AbstractContextManager:
    """The finetuner's own draws (Jacobian directions, dropout masks) come from torch's global
    generators seeded by (seed, step, process, micro-batch) for the block: the loop's stream (its
    own generator) is untouched, the data order, noise and timesteps of every step do not depend on
    how the batch is split, and processes draw independently of each other."""
    return seeded(text_seed(f"{seed}/{step}/{rank}/{micro_batch}"), device)
