"""Training data of a latent pipeline: the images encoded once by its frozen VAE and the captions
once by its frozen text encoder, written to ``output_dir/cache`` in safetensors shards and read
from there one item at a time (memory-mapped), so a run's memory does not grow with the data set.

What is stored is what the pipeline's encoders compute (encoders.py: latents, caption
embeddings, SDXL's pooled embedding and micro-conditioning, SD3's CLIP and T5 tokens and pooled
projections); a T5-less SD3 pipeline's zero T5 tokens are added on reading, not stored. Captions
are encoded once per distinct text (the empty prompt, for ``caption_dropout``, always the last).

The cache is ``manifest.json`` (what it holds: the fingerprint of the encoders and the data, the
number of items and captions, the shard sizes) and shards ``latents-NNNNN.safetensors`` (latents
with their caption index or class label) and ``captions-NNNNN.safetensors`` (embeddings), each
written atomically with a checksum of its tensors. The processes of a multi-process run share the
shards out (shard k to process k mod N); a shard that is missing, partial or fails its checksum
is encoded again, so a run killed while encoding continues from the shards it finished.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..files import atomic_write_json, read_json_object, save_tensors
from .batches import worker_options
from .encoders import encode_images, encode_texts, latent_resolution, micro_conditioning

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "2"  # bump when what is stored changes
SHARD_BYTES = 8 * 2**20  # about this much per shard: what encoding a shard holds in memory
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class CachePlan:
    """What a complete cache holds (its manifest)."""

    fingerprint: str
    items: int
    latent_shape: tuple[int, ...]
    texts: int  # distinct captions, the empty prompt included; 0 without captions
    text_shape: tuple[int, ...]  # one caption's embedding: (tokens, width)
    labels: bool
    dtype: str
    format: str = FORMAT
    pooled: int = 0  # the width of a caption's pooled embedding; 0 without
    pooled_key: str = ""  # the keyword it is the model's input under (SDXL's text_embeds, SD3's pooled_projections)
    time_ids: bool = False  # each latent has its micro-conditioning (SDXL)
    zero_tokens: int = 0  # trailing zero tokens of every caption embedding, not stored (SD3 without T5)

    def per_shard(self, kind: str) -> int:
        shape = self.latent_shape if kind == "latents" else self.text_shape
        numel = 1
        for n in shape:
            numel *= n
        return max(1, SHARD_BYTES // (numel * DTYPES[self.dtype].itemsize))

    def shards(self, kind: str) -> int:
        count = self.items if kind == "latents" else self.texts
        return -(-count // self.per_shard(kind))

    def rows(self, kind: str, shard: int) -> range:
        per, count = self.per_shard(kind), self.items if kind == "latents" else self.texts
        return range(shard * per, min((shard + 1) * per, count))

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "latent_shape": list(self.latent_shape), "text_shape": list(self.text_shape)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "CachePlan":
        return cls(**{**data, "latent_shape": tuple(data["latent_shape"]), "text_shape": tuple(data["text_shape"])})


def shard_path(root: Path, kind: str, shard: int) -> Path:
    return root / f"{kind}-{shard:05d}.safetensors"


def checksum(tensors: dict[str, Tensor]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        digest.update(f"{key}/{t.dtype}/{tuple(t.shape)}\0".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def shard_problem(root: Path, plan: CachePlan, kind: str, shard: int) -> str | None:
    """Why shard ``shard`` of ``kind`` cannot be trusted (missing, of another cache, or damaged), or None."""
    from safetensors import safe_open

    path = shard_path(root, kind, shard)
    if not path.is_file():
        return "missing"
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if (meta.get("fingerprint"), meta.get("shard")) != (plan.fingerprint, str(shard)):
                return "of another data set"
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for damaged files
        return f"unreadable ({type(e).__name__})"
    if len(next(iter(tensors.values()), ())) != len(plan.rows(kind, shard)):
        return "of another size"
    return None if meta.get("checksum") == checksum(tensors) else "damaged (checksum)"


def distinct_texts(captions: list[str]) -> list[str]:
    """The captions to encode: each distinct text once, sorted, the empty prompt last."""
    return sorted(set(captions) - {""}) + [""]


class EncodedDataset(Dataset):
    """The items of a complete cache, read from its shards one at a time: the latent, or
    ``{"sample": latent, "encoder_hidden_states": caption embedding}`` (text-to-image) or
    ``{"sample": latent, "class_labels": label}`` (a class-conditional DiT), in float32.

    ``caption_dropout``: the share of a batch's captions the loop replaces by the empty prompt
    (``drop_captions``), for classifier-free guidance. Open shards are kept per process (at most
    ``OPEN_SHARDS``; data loader workers open their own)."""

    OPEN_SHARDS = 32

    def __init__(self, root: str | Path, caption_dropout: float = 0.0) -> None:
        self.root = Path(root)
        self.plan = CachePlan.from_json(read_json_object(self.root / MANIFEST))
        if caption_dropout and not self.plan.texts:
            raise ValueError(f"caption_dropout={caption_dropout!r} needs captions; the pipeline has no text encoder")
        self.caption_dropout = caption_dropout
        self._open: collections.OrderedDict[tuple[str, int], Any] = collections.OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_open": collections.OrderedDict()}

    def __len__(self) -> int:
        return self.plan.items

    def _read(self, kind: str, index: int, name: str) -> Tensor:
        from safetensors import safe_open

        shard, row = divmod(index, self.plan.per_shard(kind))
        f = self._open.get((kind, shard))
        if f is None:
            f = self._open[(kind, shard)] = safe_open(str(shard_path(self.root, kind, shard)), "pt")
            if len(self._open) > self.OPEN_SHARDS:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end((kind, shard))
        return f.get_slice(name)[row:row + 1][0].clone()  # a copy, not a view of the mapped file

    def caption_embedding(self, text_index: int) -> Tensor:
        stored = self._read("captions", text_index, "embeddings").float()
        return torch.nn.functional.pad(stored, (0, 0, 0, self.plan.zero_tokens)) if self.plan.zero_tokens else stored

    def caption(self, text_index: int) -> dict[str, Tensor]:
        """A caption's conditioning: its embedding, and (SDXL) its pooled embedding."""
        out = {"encoder_hidden_states": self.caption_embedding(text_index)}
        if self.plan.pooled:
            out[self.plan.pooled_key] = self._read("captions", text_index, "pooled").float()
        return out

    def __getitem__(self, index: int) -> Tensor | dict[str, Tensor]:
        latent = self._read("latents", index, "latents").float()
        if self.plan.labels:
            return {"sample": latent, "class_labels": self._read("latents", index, "labels")}
        if not self.plan.texts:
            return latent
        item = {"sample": latent, **self.caption(int(self._read("latents", index, "caption_index")))}
        if self.plan.time_ids:
            item["time_ids"] = self._read("latents", index, "time_ids")
        return item

    def drop_captions(self, model_kwargs: dict[str, Tensor], drop: Tensor) -> dict[str, Tensor]:
        """``model_kwargs`` with the caption conditioning (embedding, and SDXL's pooled one) of each
        sample where ``drop`` is True replaced by the empty prompt's."""
        out = dict(model_kwargs)
        for key, empty in self.caption(self.plan.texts - 1).items():
            value = model_kwargs[key]
            where = drop.view(-1, *[1] * (value.dim() - 1)).to(value.device)
            out[key] = torch.where(where, empty.to(value.device, value.dtype), value)
        return out


# --- encoding ------------------------------------------------------------------------------------

def _hash_files(digest: Any, files: Iterable[Path]) -> None:
    for file in files:
        digest.update(str(file.name).encode() + b"\0")
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)


def fingerprint(parts: Any, data: Dataset, captions: list[str] | None, labels: list[int] | None,
                dtype: str) -> str:
    """What the encoded data depend on: the VAE, text encoder and tokenizer folders (every file's
    bytes), the images (their files' bytes, a table's column read, or the image tensors of in-memory
    data), their size, the captions, the class labels and the cache's dtype."""
    digest = hashlib.sha256(f"nni-2ndmatch encoded data {FORMAT}\0".encode())
    for name in parts.frozen:
        _hash_files(digest, sorted(p for p in (parts.path / name).rglob("*") if p.is_file()))
    files = getattr(data, "source_files", None)
    if files is not None:
        _hash_files(digest, files())
        read = [data.resolution, data.channels, len(data)]
        column = getattr(data, "image_column", None)  # a table: which of its columns the images are
        digest.update(json.dumps(read if column is None else [*read, column]).encode())
        if column is not None and parts.pooled_key == "text_embeds":  # SDXL's time_ids of a table now come from
            digest.update(b"time_ids: each image's own size\0")  # its images' sizes: such caches are encoded again
    else:
        digest.update(data.images.numpy().tobytes())
    digest.update(json.dumps([captions, labels, dtype, parts.zero_empty_prompt]).encode())
    return digest.hexdigest()


def plan_cache(parts: Any, data: Dataset, key: str, captions: list[str] | None, labels: list[int] | None,
               dtype: str, expand_greyscale: bool = False) -> tuple[CachePlan, dict[str, Tensor]]:
    """The cache's plan, from the first item encoded (returned too: what the models are checked on)."""
    latent = encode_images(parts.vae, data[0][None], expand_greyscale)[0].cpu()
    item: dict[str, Tensor] = {"sample": latent}
    text_shape: tuple[int, ...] = ()
    pooled = zero_tokens = 0
    if captions is not None:
        text = {k: v[0].cpu() for k, v in encode_texts(parts, [captions[0]]).items()}
        item["encoder_hidden_states"] = text["embeddings"]
        zero_tokens = parts.t5_tokens if parts.text_encoder_3 is None else 0  # SD3 without T5
        text_shape = (text["embeddings"].shape[0] - zero_tokens, *text["embeddings"].shape[1:])
        if "pooled" in text:
            item[parts.pooled_key], pooled = text["pooled"], text["pooled"].shape[-1]
        if parts.pooled_key == "text_embeds":
            item["time_ids"] = torch.tensor(micro_conditioning(data, 0, latent_resolution(parts, latent)))
    if labels is not None:
        item["class_labels"] = torch.tensor(labels[0])
    plan = CachePlan(fingerprint=key, items=len(data), latent_shape=tuple(latent.shape),
                     texts=len(distinct_texts(captions)) if captions is not None else 0, text_shape=text_shape,
                     labels=labels is not None, dtype=dtype, pooled=pooled, pooled_key=parts.pooled_key or "",
                     time_ids="time_ids" in item, zero_tokens=zero_tokens)
    return plan, item


def cached_plan(root: Path) -> CachePlan | None:
    """The plan in ``root``'s manifest, or None (no cache, or one of another format)."""
    try:
        plan = CachePlan.from_json(read_json_object(root / MANIFEST))
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return plan if plan.format == FORMAT else None


def start_cache(root: Path, plan: CachePlan) -> None:
    """Make ``root`` the cache of ``plan`` (main process): a cache of other data goes first."""
    if cached_plan(root) != plan and root.exists():
        for path in root.iterdir():
            if path.name == MANIFEST or path.suffix == ".safetensors" or path.name.startswith("."):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    atomic_write_json(root / MANIFEST, plan.to_json())


@dataclasses.dataclass(frozen=True)
class Encoding:
    """How the images are read and encoded: ``batch_size`` items per VAE or text-encoder call, a
    DataLoader of ``num_workers`` processes, 1-channel images expanded to the VAE's 3 when
    ``expand_greyscale``, on ``device``."""

    batch_size: int = 16
    num_workers: int = 0
    expand_greyscale: bool = False
    device: str | torch.device = "cpu"


def encode_shards(root: Path, plan: CachePlan, parts: Any, data: Dataset, captions: list[str] | None,
                  labels: list[int] | None, *, encoding: Encoding = Encoding(), rank: int = 0, world_size: int = 1,
                  progress: bool = True) -> int:
    """Encode this process's share of the shards (shard k of all, counted latents first, when
    k mod ``world_size`` == ``rank``) that are not already complete; returns how many it wrote."""
    batch_size, num_workers, expand_greyscale = encoding.batch_size, encoding.num_workers, encoding.expand_greyscale
    jobs = [(kind, k) for kind in ("latents", "captions") for k in range(plan.shards(kind))]
    mine = [job for n, job in enumerate(jobs) if n % world_size == rank]
    todo = []
    for job in mine:
        why = shard_problem(root, plan, *job)
        if why is not None:
            if why != "missing":
                logger.warning("cache shard %s is %s; encoding it again", shard_path(root, *job).name, why)
            todo.append(job)
    if not todo:
        return 0
    texts = distinct_texts(captions) if captions is not None else []
    index = {t: i for i, t in enumerate(texts)}
    dtype = DTYPES[plan.dtype]
    for model in parts.frozen.values():
        if isinstance(model, torch.nn.Module):
            model.to(encoding.device)
    began = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = sum(len(plan.rows(kind, k)) for kind, k in todo)
        bar = tqdm(total=total, desc=f"encode[{rank}]" if world_size > 1 else "encode", unit="item",
                   dynamic_ncols=True)
    tick: Callable[[int], Any] = bar.update if bar is not None else (lambda n: None)
    meta = {"fingerprint": plan.fingerprint, "process": str(rank)}
    try:
        latent_shards = [k for kind, k in todo if kind == "latents"]
        for k, latents in _encoded_latents(parts.vae, data, plan, latent_shards, batch_size, num_workers, dtype,
                                           expand_greyscale, tick):
            rows = plan.rows("latents", k)
            tensors = {"latents": latents}
            if captions is not None:
                tensors["caption_index"] = torch.tensor([index[captions[i]] for i in rows], dtype=torch.int64)
            if labels is not None:
                tensors["labels"] = torch.tensor([labels[i] for i in rows], dtype=torch.int64)
            if plan.time_ids:
                resolution = latent_resolution(parts, latents)
                tensors["time_ids"] = torch.tensor([micro_conditioning(data, i, resolution) for i in rows])
            _write_shard(root, "latents", k, tensors, meta)
        for k in (k for kind, k in todo if kind == "captions"):
            rows = plan.rows("captions", k)
            shapes = {"embeddings": plan.text_shape, **({"pooled": (plan.pooled,)} if plan.pooled else {})}
            encoded = {key: torch.empty(len(rows), *shape, dtype=dtype) for key, shape in shapes.items()}
            for start in range(0, len(rows), batch_size):
                chunk = texts[rows.start + start:rows.start + min(start + batch_size, len(rows))]
                for key, value in encode_texts(parts, chunk).items():  # zero tokens not stored (plan.zero_tokens)
                    encoded[key][start:start + len(chunk)] = value[:, :shapes[key][0]] if key == "embeddings" else value
                tick(len(chunk))
            _write_shard(root, "captions", k, encoded, meta)
    finally:
        if bar is not None:
            bar.close()
    items, seconds = sum(len(plan.rows(kind, k)) for kind, k in todo), time.perf_counter() - began
    logger.info("encoded %d item(s) in %d shard(s) in %.1f s (%.1f items/s)", items, len(todo), seconds,
                items / max(seconds, 1e-9))
    return len(todo)


def _encoded_latents(vae: Any, data: Dataset, plan: CachePlan, shards: list[int], batch_size: int, num_workers: int,
                     dtype: torch.dtype, expand_greyscale: bool,
                     tick: Callable[[int], Any]) -> Iterator[tuple[int, Tensor]]:
    """(shard, its latents) for each of ``shards``, the images read by one DataLoader (its workers
    started once) in batches that never cross a shard's end."""
    batches = [list(rows[i:i + batch_size]) for k in shards for rows in [plan.rows("latents", k)]
               for i in range(0, len(rows), batch_size)]
    images = iter(DataLoader(data, batch_sampler=batches, **worker_options(num_workers)))
    for k in shards:
        rows = plan.rows("latents", k)
        latents = torch.empty(len(rows), *plan.latent_shape, dtype=dtype)
        for start in range(0, len(rows), batch_size):
            batch = next(images)
            latents[start:start + len(batch)] = encode_images(vae, batch, expand_greyscale)
            tick(len(batch))
        yield k, latents


def _write_shard(root: Path, kind: str, shard: int, tensors: dict[str, Tensor], meta: dict[str, str]) -> None:
    save_tensors(shard_path(root, kind, shard), tensors,
                 metadata={**meta, "shard": str(shard), "checksum": checksum(tensors)})
    tensors.clear()
    release_free_memory()


def release_free_memory() -> None:
    """Give the C heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing).
    Shard after shard, glibc would otherwise keep the freed buffers of every shard in a heap that
    grows with the number of shards (its mmap threshold rises to the largest buffer freed)."""
    import ctypes

    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # the C library the interpreter runs on
    if trim is not None:
        trim(0)


def incomplete_shards(root: Path, plan: CachePlan) -> list[str]:
    """The shards that are not there (a cheap check every process makes before training)."""
    return [shard_path(root, kind, k).name for kind in ("latents", "captions") for k in range(plan.shards(kind))
            if not shard_path(root, kind, k).is_file()]
