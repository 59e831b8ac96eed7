"""What a latent pipeline's frozen encoders make of a training item, as the pipeline computes it.

A latent is the mean of the VAE's posterior, shifted and scaled as diffusers' pipelines expect
((z - shift_factor) * scaling_factor); a caption's embedding is the text encoder's last hidden
state over the tokenizer's full context, as Stable Diffusion conditions on. SD3: both CLIP
encoders' penultimate states concatenated, zero-padded to the transformer's width and followed by
T5's tokens (zeros without T5), and both pooled embeddings (``pooled_projections``). SDXL, as its
pipeline does: both text encoders' penultimate hidden states concatenated, the second's pooled
embedding (``text_embeds``), the empty prompt as zeros where the pipeline says
``force_zeros_for_empty_prompt``, and per image the six micro-conditioning numbers (``time_ids``:
the original height and width, the crop's top-left corner in the resized image, the target size).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)


@torch.no_grad()
def encode_images(vae: Any, images: Tensor, expand_greyscale: bool = False) -> Tensor:
    """The latents of images [B, C, H, W] in [-1, 1] on the VAE's device (its posterior's mean,
    shifted and scaled). ``expand_greyscale``: 1-channel images go to an RGB VAE as grey RGB."""
    channels = vae.config.in_channels
    if expand_greyscale and images.shape[1] == 1 and channels == 3:
        images = images.expand(-1, 3, -1, -1)
    if images.shape[1] != channels:
        raise ValueError(f"channels: the images have {images.shape[1]} channel(s), the pipeline's VAE takes "
                         f"{channels}; allowed: {channels}")
    scale, shift = vae.config.scaling_factor, getattr(vae.config, "shift_factor", None) or 0.0
    device = next(vae.parameters()).device
    return (vae.encode(images.to(device)).latent_dist.mean - shift) * scale


def _token_ids(tokenizer: Any, texts: list[str], device: torch.device, length: int | None = None) -> Tensor:
    """The texts' token ids over ``length`` tokens (the tokenizer's full context unless given; a
    warning names what is cut)."""
    length = length or tokenizer.model_max_length
    ids = tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    cut = [t for t, n in zip(texts, map(len, tokenizer(texts).input_ids)) if n > length]
    if cut:
        logger.warning("%d caption(s) are longer than the text encoder's %d tokens and were cut to that length, "
                       "e.g. %r", len(cut), length, cut[0])
    return ids.to(device)


@torch.no_grad()
def encode_texts(parts: Any, texts: list[str]) -> dict[str, Tensor]:
    """Each text's conditioning as the pipeline computes it: ``embeddings``, the text encoder's last
    hidden state over the tokenizer's full context; SDXL (``parts.text_encoder_2``): both encoders'
    penultimate hidden states concatenated, and ``pooled``, the second's projected pooled output,
    both zeros for the empty prompt where ``parts.zero_empty_prompt``."""
    device = next(parts.text_encoder.parameters()).device
    if parts.text_encoder_2 is None:
        return {"embeddings": parts.text_encoder(_token_ids(parts.tokenizer, texts, device))[0]}
    first = parts.text_encoder(_token_ids(parts.tokenizer, texts, device), output_hidden_states=True)
    second = parts.text_encoder_2(_token_ids(parts.tokenizer_2, texts, device), output_hidden_states=True)
    clip = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    if parts.pooled_key == "pooled_projections":
        return _sd3_conditioning(parts, texts, clip, torch.cat([first.text_embeds, second.text_embeds], dim=-1))
    out = {"embeddings": clip, "pooled": second.text_embeds}
    if parts.zero_empty_prompt:
        keep = torch.tensor([t != "" for t in texts], device=device)
        out = {k: v * keep.view(-1, *[1] * (v.dim() - 1)) for k, v in out.items()}
    return out


def _sd3_conditioning(parts: Any, texts: list[str], clip: Tensor, pooled: Tensor) -> dict[str, Tensor]:
    """SD3's: the CLIP tokens zero-padded to the transformer's width, followed by T5's
    ``parts.t5_tokens`` tokens (zeros without T5); the pooled embedding of both CLIP encoders."""
    if parts.text_encoder_3 is None:
        t5 = clip.new_zeros(len(texts), parts.t5_tokens, parts.joint_width)
    else:
        ids = _token_ids(parts.tokenizer_3, texts, clip.device, parts.t5_tokens)
        t5 = parts.text_encoder_3(ids)[0]
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return {"embeddings": torch.cat([clip, t5], dim=-2), "pooled": pooled}


def micro_conditioning(data: Dataset, index: int, resolution: int) -> list[float]:
    """SDXL's six numbers for item ``index``: its original (height, width) where the data know it
    (an image's file or table cell; otherwise the resolution), the top-left corner of the central square
    crop in the image resized to ``resolution`` on its short side, and the target size."""
    size = getattr(data, "original_size", None)
    height, width = size(index) if size is not None else (resolution, resolution)
    side = min(height, width)
    top, left = (height - side) // 2 * resolution / side, (width - side) // 2 * resolution / side
    return [float(height), float(width), float(round(top)), float(round(left)), float(resolution), float(resolution)]


def vae_downsampling(vae: Any) -> int:
    """How many image pixels a latent pixel of ``vae`` spans on a side (SD's VAE: 8)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def latent_resolution(parts: Any, latent: Tensor) -> int:
    """The image resolution a latent decodes to (its side times the VAE's downsampling)."""
    return latent.shape[-1] * vae_downsampling(parts.vae)
