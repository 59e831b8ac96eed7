"""Which items each step trains on, and how they reach the loop: a seeded order that is a pure
function of (seed, step, process count), read through a ``torch.utils.data.DataLoader`` whose
worker processes decode ahead of the step.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, NamedTuple

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from ..scoped import seeded_generator, text_seed


def epoch_permutation(epoch: int, num_items: int, seed: int) -> Tensor:
    """The order of the data in ``epoch``: a seeded permutation."""
    return torch.randperm(num_items, generator=seeded_generator(seed * 1_000_003 + epoch))


def batch_indices(step: int, num_items: int, batch_size: int, seed: int) -> Tensor:
    """Dataset indices of global batch ``step``: a fresh seeded permutation per epoch, last
    incomplete batch dropped. A pure function of its arguments, so a resumed run sees the same data."""
    epoch, j = divmod(step, num_items // batch_size)
    return epoch_permutation(epoch, num_items, seed)[j * batch_size:(j + 1) * batch_size]


ITEMS = ("a float image tensor [C, H, W] in [-1, 1], or a dict with it under 'sample' and the conditioning under "
         "the model's keyword names (e.g. {'sample': image, 'class_labels': label})")


def _check_item(item: Any) -> None:
    """A ValueError naming what a data item is, unless it is one ``collate`` stacks."""
    image = item.get("sample") if isinstance(item, dict) else item
    if isinstance(image, Tensor) and image.is_floating_point():
        return
    if isinstance(item, dict):
        what = "a dict without 'sample'" if "sample" not in item else f"a dict whose 'sample' is {_kind(image)}"
    else:
        what = _kind(item) + (" (such as a torchvision dataset's (image, label))" if isinstance(item, tuple) else "")
    raise ValueError(f"a data item is {what}; allowed: {ITEMS}")


def _kind(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor"
    return f"a {type(value).__name__}"


def collate(items: list[Any], device: torch.device | str = "cpu") -> tuple[Tensor, dict[str, Tensor]]:
    """Stack data items: image tensors, or dicts with the image under "sample" and the model's
    conditioning (class_labels, encoder_hidden_states, ...) under its keyword names. An item of
    another kind (checked on the first) is a ValueError saying what it is and what is allowed."""
    _check_item(items[0])
    if isinstance(items[0], dict):
        x0 = torch.stack([item["sample"] for item in items]).to(device)
        kwargs = {k: torch.stack([torch.as_tensor(item[k]) for item in items]).to(device)
                  for k in items[0] if k != "sample"}
        return x0, kwargs
    return torch.stack(items).to(device), {}


class ItemKey(NamedTuple):
    """One read of one item: its index, and the step and batch position it is read for."""

    index: int
    step: int
    position: int


class Reads(Dataset):
    """A dataset read by ``ItemKey``: ``dataset[index]``, or for a dataset whose reads are random
    (``random_reads``, e.g. dequantisation) ``dataset.read(index, generator)`` with a generator
    seeded by (seed, step, position): the same values in any worker, after any resume."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed
        self.random = bool(getattr(dataset, "random_reads", False))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: ItemKey) -> Any:
        if not self.random:
            return self.dataset[key.index]
        return self.dataset.read(key.index, seeded_generator(text_seed(f"{self.seed}/{key.step}/{key.position}")))


class StepBatches(Sampler):
    """The keys of this process's micro-batches, step after step from ``start`` to ``stop``: of
    global batch ``batch_indices(step, ...)``, the positions ``micro_batches`` lists (this
    process's share, split for gradient accumulation), one list of keys per micro-batch."""

    def __init__(self, num_items: int, batch_size: int, seed: int, start: int, stop: int,
                 micro_batches: list[Tensor]) -> None:
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.start, self.stop, self.micro_batches = start, stop, micro_batches

    def __len__(self) -> int:
        return (self.stop - self.start) * len(self.micro_batches)

    def __iter__(self) -> Iterator[list[ItemKey]]:
        per_epoch = self.num_items // self.batch_size
        order_of = (None, None)  # (epoch, permutation): one permutation per epoch
        for step in range(self.start, self.stop):
            epoch, j = divmod(step, per_epoch)
            if order_of[0] != epoch:
                order_of = (epoch, epoch_permutation(epoch, self.num_items, self.seed))
            indices = order_of[1][j * self.batch_size:(j + 1) * self.batch_size]
            for positions in self.micro_batches:
                yield [ItemKey(int(indices[p]), step, int(p)) for p in positions]


def auto_workers(dataset: Dataset) -> int:
    """``num_workers: auto``: none for data held in memory or mapped from disk (reading an item
    costs less than starting a process); for data that decodes images (``decodes``), this
    process's share of the CPUs (the launcher's processes on this machine share them) beyond
    torch's threads, between 1 and 8."""
    if not getattr(dataset, "decodes", False):
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(8, cpus // local - torch.get_num_threads()))


#: How data loader workers start: as fresh interpreters. A forked worker shares the training
#: process's pages, and every page that process writes afterwards (its heap churning, the weights
#: and optimizer state updated each step) stays behind in the worker as a private copy: measured
#: here, a worker grew to the whole size of the process it was forked from.
WORKER_START = "spawn"


def worker_options(num_workers: int) -> dict[str, Any]:
    """DataLoader arguments for ``num_workers`` worker processes (none: read in this process)."""
    return {"num_workers": num_workers, "prefetch_factor": 2 if num_workers else None,
            "multiprocessing_context": WORKER_START if num_workers else None}


def batch_loader(dataset: Dataset, sampler: StepBatches, seed: int, num_workers: int | str = "auto",
                 pin_memory: bool = False) -> DataLoader:
    """A DataLoader of ``(x0, model_kwargs)`` micro-batches on the CPU, in ``sampler``'s order;
    ``num_workers`` processes decode ahead (two micro-batches each)."""
    workers = auto_workers(dataset) if num_workers == "auto" else int(num_workers)
    return DataLoader(Reads(dataset, seed), batch_sampler=sampler, collate_fn=collate, pin_memory=pin_memory,
                      generator=seeded_generator(seed), **worker_options(workers))  # global stream left alone
