"""Training data of a latent pipeline: the images encoded once by its frozen VAE and the captions
once by its frozen text encoder, kept in ``output_dir/cache`` (safetensors) under a fingerprint of
the encoders and the data, so a resumed or repeated run reuses them and changed data is re-encoded.

A latent is the mean of the VAE's posterior, shifted and scaled as diffusers' pipelines expect
((z - shift_factor) * scaling_factor; the VAEs of the supported pipelines have no shift); a
caption's embedding is the text encoder's last hidden state over the tokenizer's full context, as
Stable Diffusion conditions on. Captions are stored once per distinct text; the empty prompt (for
``caption_dropout``) is always the last row. Everything is held in memory: about 236 KB per
distinct caption for SD's 77x768 context and 64 KB per 512x512 image's latent.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .files import save_tensors
from .models import PipelineParts

logger = logging.getLogger(__name__)

CACHE_FILE = Path("cache") / "encoded.safetensors"
FORMAT = "1"  # bump when what is stored changes


class EncodedDataset(Dataset):
    """Latents, and each item's conditioning: items are the latent, ``{"sample": latent,
    "encoder_hidden_states": caption embedding}`` (text-to-image) or ``{"sample": latent,
    "class_labels": label}`` (a class-conditional DiT).

    ``caption_dropout``: the share of a batch's captions the loop replaces by the empty prompt
    (``drop_captions``), for classifier-free guidance."""

    def __init__(self, latents: Tensor, embeddings: Tensor | None = None, caption_index: Tensor | None = None,
                 caption_dropout: float = 0.0, labels: Tensor | None = None) -> None:
        if (embeddings is None) != (caption_index is None):
            raise ValueError("embeddings and caption_index go together")
        if caption_dropout and embeddings is None:
            raise ValueError(f"caption_dropout={caption_dropout!r} needs captions; the pipeline has no text encoder")
        self.latents, self.embeddings, self.caption_index = latents, embeddings, caption_index
        self.caption_dropout, self.labels = caption_dropout, labels

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, index: int) -> Tensor | dict[str, Tensor]:
        if self.labels is not None:
            return {"sample": self.latents[index], "class_labels": self.labels[index]}
        if self.embeddings is None:
            return self.latents[index]
        return {"sample": self.latents[index], "encoder_hidden_states": self.embeddings[self.caption_index[index]]}

    def drop_captions(self, model_kwargs: dict[str, Tensor], drop: Tensor) -> dict[str, Tensor]:
        """``model_kwargs`` with the caption embedding of each sample where ``drop`` is True
        replaced by the empty prompt's."""
        states = model_kwargs["encoder_hidden_states"]
        empty = self.embeddings[-1].to(states.device, states.dtype)
        return {**model_kwargs, "encoder_hidden_states": torch.where(drop.view(-1, 1, 1).to(states.device),
                                                                      empty, states)}

    def tensors(self) -> dict[str, Tensor]:
        out = {"latents": self.latents}
        if self.embeddings is not None:
            out.update(embeddings=self.embeddings, caption_index=self.caption_index)
        if self.labels is not None:
            out.update(labels=self.labels)
        return out


def _hash_files(digest: Any, root: Path, files: list[Path]) -> None:
    for file in files:
        digest.update(str(file.relative_to(root)).encode() + b"\0")
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)


def fingerprint(parts: PipelineParts, data: Dataset, captions: list[str] | None,
                labels: list[int] | None = None) -> str:
    """What the encoded data depends on: the VAE, text encoder and tokenizer folders (every file's
    bytes), the images (an image folder's file bytes, else the image tensors), their size, the
    captions and the class labels."""
    digest = hashlib.sha256(f"nni-2ndmatch encoded data {FORMAT}\0".encode())
    for name in ("vae", "text_encoder", "tokenizer"):
        folder = parts.path / name
        if getattr(parts, name) is not None:
            _hash_files(digest, folder, sorted(p for p in folder.rglob("*") if p.is_file()))
    files = getattr(data, "files", None)
    if files is not None:  # an image folder: the files as they are now
        _hash_files(digest, data.root, list(files))
        digest.update(json.dumps([data.resolution, data.channels]).encode())
    else:
        digest.update(data.images.numpy().tobytes())
    digest.update(json.dumps([captions, labels]).encode())
    return digest.hexdigest()


@torch.no_grad()
def encode(parts: PipelineParts, data: Dataset, captions: list[str] | None, labels: list[int] | None = None,
           batch_size: int = 16, caption_dropout: float = 0.0, device: str = "cpu",
           expand_greyscale: bool = False) -> EncodedDataset:
    """Encode every image of ``data`` (tensors in [-1, 1]) with the VAE and every distinct caption
    with the text encoder, on ``device`` (the results on the CPU); ``labels`` are kept as they are.
    ``expand_greyscale``: feed 1-channel images to an RGB VAE as grey RGB (the built-in digits)."""
    vae = parts.vae.to(device)
    channels = vae.config.in_channels
    scale, shift = vae.config.scaling_factor, getattr(vae.config, "shift_factor", None) or 0.0
    latents = []
    for start in range(0, len(data), batch_size):
        x = torch.stack([data[i] for i in range(start, min(start + batch_size, len(data)))])
        if expand_greyscale and x.shape[1] == 1 and channels == 3:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[1] != channels:
            raise ValueError(f"channels: the images have {x.shape[1]} channel(s), the pipeline's VAE takes "
                             f"{channels}; allowed: {channels}")
        latents.append(((vae.encode(x.to(device)).latent_dist.mean - shift) * scale).cpu())
        done = min(start + batch_size, len(data))
        if done == len(data) or done // max(1, len(data) // 10) != start // max(1, len(data) // 10):
            logger.info("encoded %d/%d images with the VAE", done, len(data))
    latents = torch.cat(latents).contiguous()
    if captions is None:
        return EncodedDataset(latents, labels=None if labels is None else torch.tensor(labels, dtype=torch.long))
    texts = sorted(set(captions) - {""}) + [""]  # the empty prompt last
    tokenizer = parts.tokenizer
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    lengths = [len(t) for t in tokenizer(texts).input_ids]  # before truncation
    cut = [t for t, n in zip(texts, lengths) if n > tokenizer.model_max_length]
    if cut:
        logger.warning("%d caption(s) are longer than the text encoder's %d tokens and were cut to that length, "
                       "e.g. %r", len(cut), tokenizer.model_max_length, cut[0])
    text_encoder = parts.text_encoder.to(device)
    embeddings = torch.cat([text_encoder(ids[i:i + batch_size].to(device))[0].cpu()
                            for i in range(0, len(ids), batch_size)])
    index = {t: i for i, t in enumerate(texts)}
    caption_index = torch.tensor([index[c] for c in captions], dtype=torch.long)
    return EncodedDataset(latents, embeddings.contiguous(), caption_index, caption_dropout)


def load_cached(file: Path, expected: str, caption_dropout: float) -> EncodedDataset | None:
    """The encoded data in ``file`` if its fingerprint is ``expected``, else None."""
    from safetensors import safe_open

    if not file.is_file():
        return None
    try:
        with safe_open(str(file), "pt") as f:
            if (f.metadata() or {}).get("fingerprint") != expected:
                return None
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # a damaged cache is re-encoded, never trusted
        logger.warning("cache %s is unreadable (%s); encoding again", file, e)
        return None
    return EncodedDataset(tensors["latents"], tensors.get("embeddings"), tensors.get("caption_index"),
                          caption_dropout, tensors.get("labels"))


def save_cached(data: EncodedDataset, file: Path, fingerprint_: str) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    save_tensors(file, data.tensors(), metadata={"fingerprint": fingerprint_, "format": FORMAT})
