"""Multi-process finetuning on Hugging Face Accelerate (DDP), chosen when a launcher starts us.

    accelerate launch --num_processes 4 -m nni_2ndmatch.cli finetune CONFIG.yaml
    torchrun --nproc_per_node 4 -m nni_2ndmatch.cli finetune CONFIG.yaml

Accelerate sets up the process group (NCCL on GPUs, gloo on CPUs, one or many machines) and wraps
the student in DistributedDataParallel; the teacher is only moved to each process's device: it
runs frozen, with no gradient synchronisation. The loop (``nni_2ndmatch.training.finetune``) draws
the random numbers of the whole global batch on every process and each process takes its share,
so the data order, noise and timesteps depend on the seed only, not on the number of processes;
the main process writes every file.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..errors import MainProcessFailed
from .runtime import Runtime, T

SUPPORTED = ("NO", "MULTI_CPU", "MULTI_GPU")


def launched_distributed() -> bool:
    """True when a launcher (accelerate launch, torchrun) started more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def check_launcher_settings() -> None:
    """A ValueError for accelerate's own settings that would change the loop behind its back (on
    one process as on several: they are not ignored either way)."""
    for var, allowed, advice in (
            ("ACCELERATE_MIXED_PRECISION", "no", "set finetune.mixed_precision in the config instead (accelerate's "
             "autocast would wrap every pass, and the Jacobian term must stay fp32)"),
            ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1",
             "set finetune.gradient_accumulation_steps in the config instead"),
            ("ACCELERATE_DYNAMO_BACKEND", "no",
             "launch without it: torch.compile does not support the Jacobian term's double backward")):
        value = os.environ.get(var, allowed)
        if value.lower() != allowed:
            raise ValueError(f"accelerate's {var.removeprefix('ACCELERATE_').lower()}={value!r} is not used; "
                             f"{advice}")


class AccelerateRuntime(Runtime):
    """One process of a multi-process finetune: DDP through ``accelerate.Accelerator``.

    ``device``: "cpu" or "cuda" (each process gets its local GPU). ``timeout_s``: how long a
    collective waits for the other processes before the run fails (a dead process is usually
    noticed at once: the launcher stops the others).
    """

    def __init__(self, device: str | torch.device = "cpu", timeout_s: float = 1800.0) -> None:
        try:
            from accelerate import Accelerator, InitProcessGroupKwargs
        except ImportError as e:  # pragma: no cover - accelerate is a dependency
            raise ImportError("multi-process finetuning needs accelerate: pip install accelerate") from e
        check_launcher_settings()
        self.accelerator = Accelerator(
            cpu=torch.device(device).type == "cpu", mixed_precision="no",
            kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=timeout_s))])
        kind = self.accelerator.distributed_type.name
        if kind not in SUPPORTED:
            raise ValueError(f"accelerate distributed_type={kind!r} is not supported; allowed: "
                             f"{', '.join(SUPPORTED)} (DDP: checkpoints hold the full optimizer state)")
        self.device = self.accelerator.device
        self.rank, self.world_size = self.accelerator.process_index, self.accelerator.num_processes

    def prepare(self, student: nn.Module, teacher) -> nn.Module:
        if isinstance(teacher, nn.Module):
            teacher.to(self.device)
        return self.accelerator.prepare_model(student)

    def sync_gradients(self, model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if sync else self.accelerator.no_sync(model)

    def mean(self, values: Tensor) -> Tensor:
        return self.accelerator.reduce(values.to(self.device), reduction="mean").cpu()

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def same_on_every_process(self, values: tuple[int, ...]) -> bool:
        low = torch.tensor(values, dtype=torch.int64, device=self.device)
        high = low.clone()
        torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
        torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
        return torch.equal(low, high)

    def on_main(self, work: Callable[[], T]) -> T | None:
        self.barrier()  # every process has read what the work may change (config.yaml under --overwrite)
        outcome = torch.zeros((), dtype=torch.int64, device=self.device)  # 0, or the main process's exit code
        result = None
        if self.is_main:
            try:
                result = work()
            except BaseException as e:  # Ctrl-C too: the others may be waiting in the broadcast, deaf to it
                outcome.fill_(130 if isinstance(e, KeyboardInterrupt) else getattr(e, "exit_code", 1) or 1)
                torch.distributed.broadcast(outcome, src=0)
                outcome.item()  # NCCL only queues the broadcast: it must be sent before this process exits
                raise
        torch.distributed.broadcast(outcome, src=0)
        if outcome.item():
            raise MainProcessFailed(int(outcome.item()))
        return result

    def unwrap(self, model: nn.Module) -> nn.Module:
        return self.accelerator.unwrap_model(model)
