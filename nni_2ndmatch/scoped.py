"""Scoped changes to torch's process-wide state, each undone when its block ends (also on error):
the number of CPU threads, and the global random streams (seeded for a block, or replayed).
Nothing else in the package calls torch.set_num_threads, torch.manual_seed or the RNG state
functions; random draws of the package's own take an explicit ``torch.Generator`` made here
(``seeded_generator``).
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Callable, Iterator

import torch


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op CPU threads set to ``threads`` inside the block (None: unchanged)."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _cuda_devices(device: torch.device | None) -> list[int]:
    if device is None or device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """torch's global generators (the CPU one, and ``device``'s if it is a GPU) seeded with ``seed``
    inside the block and restored after it: for draws that cannot take a generator (a module's
    initialisation, dropout masks)."""
    with torch.random.fork_rng(devices=_cuda_devices(device)):
        torch.manual_seed(seed)
        yield


def rng_replay(device: torch.device | None = None) -> Callable[[], None]:
    """A function that puts torch's global generators (CPU, and ``device``'s if it is a GPU) back
    to where they are now: for evaluations that must draw the same random numbers (dropout masks)."""
    devices = _cuda_devices(device)
    cpu = torch.get_rng_state()
    cuda = [torch.cuda.get_rng_state(d) for d in devices]

    def replay() -> None:
        torch.set_rng_state(cpu)
        for d, state in zip(devices, cuda):
            torch.cuda.set_rng_state(state, d)
    return replay


def text_seed(text: str) -> int:
    """A seed in [0, 2**63) from ``text`` (blake2b): the same in every process and on every run."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU random stream of its own, seeded with ``seed``: what every explicit draw in the
    package takes (``generator=``), so that no draw touches torch's global stream."""
    return torch.Generator().manual_seed(seed)
