"""Safe file output: nothing is ever half-written, and nothing is ever a pickle.

Files are written to a temporary name in the same folder, flushed to disk and renamed over the
target; folders are assembled under a temporary name and renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load as _st_load

from .errors import UserError


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file beside ``path`` to write; when the block ends it is flushed to disk
    and renamed over ``path`` (on error it is removed and ``path`` is untouched)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # the permissions of an ordinary new file, not mkstemp's 0600 (set after the writer, which may
        # have made the file anew: safetensors writes one of its own, 0600)
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_results(path: str | os.PathLike, results: Any, markdown: str) -> None:
    """Results as JSON at ``path`` and their Markdown summary beside it (.md), both atomically."""
    atomic_write_json(path, results)
    atomic_write_text(Path(path).with_suffix(".md"), markdown)


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                 metadata: dict[str, str] | None = None) -> None:
    """Write tensors as safetensors, atomically, streamed to the file (no copy of the whole file in
    memory); tensors on another device are copied to the CPU, tensors that share storage apart."""
    from safetensors.torch import save_file

    plain, seen = {}, set()
    for key, value in tensors.items():
        value = value.detach().to("cpu").contiguous()
        if value.numel() and value.untyped_storage().data_ptr() in seen:  # safetensors refuses shared storage
            value = value.clone()
        seen.add(value.untyped_storage().data_ptr())
        plain[key] = value
    with atomic_file(path) as tmp:
        save_file(plain, str(tmp), metadata=metadata)


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file; a truncated or corrupted file is a ValueError naming it."""
    from safetensors import SafetensorError

    try:
        return _st_load(Path(path).read_bytes())
    except SafetensorError as e:
        raise ValueError(f"{path} is not a complete safetensors file (truncated or corrupted?): {e}") from None


def check_replaceable(path: str | os.PathLike, marker: str) -> None:
    """A UserError unless the folder ``path`` may be replaced whole: it does not exist, is empty,
    or holds ``marker`` (an earlier folder of the kind that replaces it)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{str(path)!r} is a file, and writing the folder would replace it; give a new or empty folder")
    held = [] if not path.is_dir() or (path / marker).is_file() else \
        sorted(p.name for p in path.iterdir() if not p.name.startswith("."))  # .DS_Store and the like: not the user's
    if held:
        raise UserError(f"{str(path)!r} holds other files ({', '.join(held[:5])}{', ...' if len(held) > 5 else ''}) "
                        f"and no {marker}, and writing would replace it whole; give a new or empty folder")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, marker: str | None = None) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``path`` whole, on error it is removed.
    ``marker``: a file that an earlier folder of this kind holds (config.json); an existing folder
    that holds other files but not it is refused before any work (a ValueError naming them), so
    that a folder the user named is never replaced with everything else in it. None: the
    package's own folders (checkpoints), replaced as they are."""
    path = Path(path)
    if marker is not None:
        check_replaceable(path, marker)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # an ordinary new folder, not mkdtemp's 0700
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON object in ``path``; malformed JSON or another top-level value is a ValueError naming it."""
    from .utils import json_kind

    try:
        value = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: the top level must be an object, got {json_kind(value)}")
    return value
