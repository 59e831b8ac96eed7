"""The built-in pipelines: ``tiny-sd`` (Stable Diffusion 1.x layout), ``tiny-sdxl`` (SDXL layout) and
``tiny-sd3`` (SD3 layout, flow matching),
pipeline folders of seeded random components written on demand, with local byte-level tokenizers:
no download, a run in seconds anywhere."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from ..scoped import seeded
from .pipelines import needs_transformers

TINY_SD_TOKENS = 32  # the tiny text encoders' context (CLIP's is 77)
TEXT_WIDTH = 32  # each tiny text encoder's hidden size


def _byte_vocabulary() -> dict[str, int]:
    """A CLIP BPE vocabulary with no merges: each of the 256 bytes (in CLIP's printable byte
    alphabet), alone and at a word's end, and the start/end tokens. Any text tokenises."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    alphabet = [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]
    tokens = [*alphabet, *(c + "</w>" for c in alphabet), "<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}


def _tokenizer(folder: Path) -> Any:
    """A byte-level CLIPTokenizer written to ``folder`` and read back."""
    transformers = needs_transformers("a builtin pipeline")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(_byte_vocabulary()))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": TINY_SD_TOKENS}))
    return transformers.CLIPTokenizer.from_pretrained(folder)


def _text_encoder(cls_name: str, **extra: Any) -> Any:
    """A 2-layer CLIP text model of width TEXT_WIDTH over the byte vocabulary (seeded by the caller)."""
    transformers = needs_transformers("a builtin pipeline")
    vocab = _byte_vocabulary()
    config = transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=TINY_SD_TOKENS, bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"], **extra)
    return getattr(transformers, cls_name)(config)


def _vae(resolution: int, **extra: Any) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=8, layers_per_block=1, sample_size=resolution, **extra)


def _unet(resolution: int, cross_attention_dim: int, **extra: Any) -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=resolution // 2, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=cross_attention_dim,
                                attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), **extra)


def write_tiny_sd(folder: str | os.PathLike, seed: int = 0, resolution: int = 16) -> Path:
    """Write ``tiny-sd``: a Stable Diffusion pipeline folder with seeded random components of the
    SD-1.x families (AutoencoderKL with 2x downsampling, a cross-attention UNet2DConditionModel, a
    2-layer CLIPTextModel with a byte-level tokenizer, SD's scaled-linear schedule), about 1.0M
    parameters in all, for ``resolution`` x ``resolution`` RGB images. Runs anywhere in seconds."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    folder = Path(folder)
    with seeded(seed):
        vae, unet = _vae(resolution), _unet(resolution, TEXT_WIDTH)
        text_encoder = _text_encoder("CLIPTextModel")
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, set_alpha_to_one=False,
                              steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=_tokenizer(folder / "tokenizer"),
                                   unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


SDXL_TIME_EMBED = 8  # the tiny U-Net's addition_time_embed_dim (SDXL's is 256)


def write_tiny_sdxl(folder: str | os.PathLike, seed: int = 0, resolution: int = 16) -> Path:
    """Write ``tiny-sdxl``: a StableDiffusionXLPipeline folder of seeded random components in SDXL's
    layout: two text encoders (CLIPTextModel and CLIPTextModelWithProjection, whose penultimate
    hidden states are concatenated into the U-Net's cross-attention input and whose second pooled
    embedding, with the six micro-conditioning numbers, enters its ``text_time`` added embedding),
    byte-level tokenizers, the AutoencoderKL of ``tiny-sd`` and SDXL's Euler scaled-linear schedule."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    folder = Path(folder)
    with seeded(seed):
        vae = _vae(resolution)
        unet = _unet(resolution, 2 * TEXT_WIDTH, addition_embed_type="text_time",
                     addition_time_embed_dim=SDXL_TIME_EMBED,
                     projection_class_embeddings_input_dim=TEXT_WIDTH + 6 * SDXL_TIME_EMBED)
        text_encoder = _text_encoder("CLIPTextModel")
        text_encoder_2 = _text_encoder("CLIPTextModelWithProjection", projection_dim=TEXT_WIDTH)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=_tokenizer(folder / "tokenizer"),
                                     tokenizer_2=_tokenizer(folder / "tokenizer_2"), unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def _t5_tokenizer(folder: Path) -> Any:
    """A character-level T5 tokenizer (a Unigram over the printable ASCII characters) written to
    ``folder`` and read back."""
    import string

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors

    transformers = needs_transformers("a builtin pipeline")
    pieces = ["\u2581", *(c for c in string.printable if c not in "\t\n\r\x0b\x0c")]
    tokenizer = Tokenizer(models.Unigram([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *((c, -1.0) for c in pieces)],
                                         unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    transformers.T5TokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                 extra_ids=0, model_max_length=512).save_pretrained(folder)
    return transformers.T5TokenizerFast.from_pretrained(folder)


def write_tiny_sd3(folder: str | os.PathLike, seed: int = 0, resolution: int = 16, t5: bool = False) -> Path:
    """Write ``tiny-sd3``: a StableDiffusion3Pipeline folder of seeded random components in SD3's
    layout: a 2-block joint (MMDiT) SD3Transformer2DModel, two CLIP text encoders with projections
    (their penultimate states concatenated as the text tokens, their pooled projections as
    ``pooled_projections``), T5 left out as SD3 allows (its tokens are zeros; ``t5``: a 1-layer
    T5 encoder with a character-level tokenizer), an AutoencoderKL with a shift factor, and SD3's
    flow-matching schedule (FlowMatchEulerDiscreteScheduler, shift 3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    folder = Path(folder)
    text_encoder_3 = tokenizer_3 = None
    with seeded(seed):
        if t5:
            transformers = needs_transformers("a builtin pipeline")
            tokenizer_3 = _t5_tokenizer(folder / "tokenizer_3")
            text_encoder_3 = transformers.T5EncoderModel(transformers.T5Config(
                vocab_size=len(tokenizer_3), d_model=2 * TEXT_WIDTH, d_kv=8, d_ff=2 * TEXT_WIDTH, num_layers=1,
                num_heads=4, pad_token_id=0, eos_token_id=1))
        vae = _vae(resolution, shift_factor=0.1, scaling_factor=1.5)
        transformer = SD3Transformer2DModel(sample_size=resolution // 2, patch_size=2, in_channels=4, out_channels=4,
                                            num_layers=2, attention_head_dim=8, num_attention_heads=4,
                                            joint_attention_dim=2 * TEXT_WIDTH, caption_projection_dim=32,
                                            pooled_projection_dim=2 * TEXT_WIDTH, pos_embed_max_size=resolution // 2)
        text_encoder = _text_encoder("CLIPTextModelWithProjection", projection_dim=TEXT_WIDTH)
        text_encoder_2 = _text_encoder("CLIPTextModelWithProjection", projection_dim=TEXT_WIDTH)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=text_encoder, tokenizer=_tokenizer(folder / "tokenizer"),
                                    text_encoder_2=text_encoder_2, tokenizer_2=_tokenizer(folder / "tokenizer_2"),
                                    text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


#: The built-in pipelines by name, each written by ``writer(folder, seed=, resolution=)``.
TINY_PIPELINES: dict[str, Callable[..., Path]] = {"tiny-sd": write_tiny_sd, "tiny-sdxl": write_tiny_sdxl,
                                                  "tiny-sd3": write_tiny_sd3}
