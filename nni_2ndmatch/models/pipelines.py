"""Diffusers pipeline folders as teachers: what a run takes from one (its denoiser, its training
noise schedule, and for a latent pipeline the frozen VAE, and the text encoder and tokenizer of a
text-to-image one), and the built-in ``tiny-sd`` pipeline.

Only JSON and safetensors are read; no component's code comes from the folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..files import read_json_object
from ..method.schedule import PREDICTION_TYPES
from ..scoped import seeded

PIPELINE_INDEX = "model_index.json"
DENOISERS = ("unet", "transformer")
#: The components a run loads besides the denoiser, and the classes allowed for each.
FROZEN_PARTS = {"vae": ("AutoencoderKL",), "text_encoder": ("CLIPTextModel",),
                "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast")}
#: Pipeline families refused by name (model_index.json's ``_class_name`` starts with the key), before
#: their components are looked at. The refiner is listed before the SDXL family it belongs to.
UNSUPPORTED_FAMILIES = {
    "StableDiffusionXLImg2Img": "an SDXL refiner", "StableDiffusionXL": "SDXL", "StableDiffusion3": "SD3",
    "Flux": "Flux", "UnCLIP": "unCLIP", "StableUnCLIP": "unCLIP", "Kandinsky": "Kandinsky (a prior cascade)",
    "Wuerstchen": "Wuerstchen (a cascade)", "StableCascade": "Stable Cascade (a cascade)",
    "IF": "DeepFloyd IF (a cascade)", "TextToVideo": "video", "VideoToVideo": "video",
    "StableVideoDiffusion": "video", "AnimateDiff": "video", "I2VGen": "video", "CogVideoX": "video",
    "LTX": "video", "HunyuanVideo": "video", "Wan": "video", "Mochi": "video", "PixArt": "PixArt (a T5 text encoder)",
    "Sana": "Sana", "AuraFlow": "AuraFlow", "Lumina": "Lumina", "Kolors": "Kolors",
}
SUPPORTED_FAMILIES = ("Stable Diffusion 1.x/2.x (StableDiffusionPipeline and its img2img/inpaint kin)",
                      "DiT (DiTPipeline)", "pixel-space DDPM/DDIM pipelines (DDPMPipeline, DDIMPipeline)")
#: Components of pipelines whose conditioning the finetuning does not provide (SDXL, SD3, unCLIP, LDM's VQ-VAE).
UNSUPPORTED_PARTS = ("text_encoder_2", "text_encoder_3", "tokenizer_2", "tokenizer_3", "vqvae", "image_encoder",
                     "prior", "image_noising_scheduler")


def is_pipeline_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / PIPELINE_INDEX).is_file()


def pipeline_components(path: str | os.PathLike) -> dict[str, str]:
    """The components a pipeline folder's model_index.json names, with their class names."""
    index = read_json_object(Path(path) / PIPELINE_INDEX)
    return {k: str(v[1]) for k, v in index.items()
            if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[0] is not None}


def pipeline_denoiser(path: str | os.PathLike) -> str:
    """The component name of a pipeline's denoiser ("unet" or "transformer"), after checking that
    the run can train it: a VAE only of the AutoencoderKL kind, a text encoder only a CLIP one with
    its tokenizer, no second text encoder, and a scheduler with a supported prediction type.
    Otherwise a ValueError naming the file, the entry and what is allowed."""
    path = Path(path)
    index_file = path / PIPELINE_INDEX
    class_name = str(read_json_object(index_file).get("_class_name", ""))
    family = next((f for prefix, f in UNSUPPORTED_FAMILIES.items() if class_name.startswith(prefix)), None)
    if family is not None:
        raise ValueError(f"{index_file}: _class_name {class_name} is {family}, which is not supported yet; "
                         f"supported: {'; '.join(SUPPORTED_FAMILIES)}")
    components = pipeline_components(path)
    denoisers = [k for k in DENOISERS if k in components]
    if not denoisers:
        raise ValueError(f"{index_file}: no denoiser component; expected one of {', '.join(DENOISERS)} "
                         f"(components: {', '.join(components)})")
    unsupported = [k for k in UNSUPPORTED_PARTS if k in components]
    if unsupported:
        raise ValueError(f"{index_file}: the pipeline has {', '.join(unsupported)}, whose conditioning the finetuning "
                         "does not provide; allowed: a denoiser with a scheduler, and optionally vae (AutoencoderKL), "
                         "text_encoder (CLIPTextModel) and tokenizer (Stable Diffusion 1.x/2.x and DiT layouts)")
    for name, allowed in FROZEN_PARTS.items():
        if name in components and components[name] not in allowed:
            raise ValueError(f"{index_file}: {name} is {components[name]}; allowed: {', '.join(allowed)}")
    if "text_encoder" in components and "vae" not in components:
        raise ValueError(f"{index_file}: a text_encoder without a vae (a pixel-space text-to-image pipeline) is not "
                         "supported; allowed: Stable Diffusion layouts (vae, text_encoder, tokenizer)")
    if ("text_encoder" in components) != ("tokenizer" in components):
        raise ValueError(f"{index_file}: a text_encoder needs its tokenizer and a tokenizer its text_encoder; "
                         f"components: {', '.join(components)}")
    training_scheduler(path)  # the schedule is readable and its prediction type supported
    return denoisers[0]


def training_scheduler(path: str | os.PathLike) -> Any:
    """The DDPM training schedule of a pipeline: its scheduler's betas, number of steps and
    prediction type (``DDPMScheduler.from_config``, as diffusers' training scripts do), or the
    default schedule when the pipeline has no scheduler config."""
    from diffusers import DDPMScheduler

    from ..method import default_scheduler

    file = Path(path) / "scheduler" / "scheduler_config.json"
    if not file.is_file():
        return default_scheduler()
    config = read_json_object(file)
    if "beta_schedule" not in config and config.get("trained_betas") is None:
        raise ValueError(f"{file}: {config.get('_class_name')} has no beta schedule; allowed: the DDPM family "
                         "(DDPM, DDIM, PNDM, Euler, DPM-Solver ... schedulers with betas), not flow matching")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise ValueError(f"{file}: prediction_type={prediction!r} is not supported; allowed: "
                         f"{', '.join(PREDICTION_TYPES)}")
    try:
        return DDPMScheduler.from_config(config)
    except (NotImplementedError, ValueError, TypeError) as e:  # e.g. an unknown beta_schedule
        raise ValueError(f"{file}: not a schedule DDPM training can use: {e}") from None


@dataclass
class PipelineParts:
    """What a run takes from a pipeline folder besides the denoiser. ``vae`` is None for a
    pixel-space pipeline; ``text_encoder`` and ``tokenizer`` are None without text conditioning."""

    path: Path
    denoiser: str
    scheduler: Any
    vae: nn.Module | None = None
    text_encoder: nn.Module | None = None
    tokenizer: Any = None
    keep: Any = None  # what must live as long as the parts (the temporary folder of a builtin pipeline)

    @property
    def latent(self) -> bool:
        return self.vae is not None


def needs_transformers(what: str) -> Any:
    try:
        import transformers
    except ImportError:
        raise ValueError(f"{what} needs the transformers package: pip install 'nni-2ndmatch[text]' "
                         "(or pip install transformers)") from None
    return transformers


def load_pipeline_parts(path: str | os.PathLike) -> PipelineParts:
    """The denoiser's name, the training schedule and the frozen VAE / text encoder / tokenizer of
    a pipeline folder (safetensors weights only), in eval mode without gradients."""
    path = Path(path)
    denoiser = pipeline_denoiser(path)
    components = pipeline_components(path)
    parts = PipelineParts(path, denoiser, training_scheduler(path))
    if "vae" in components:
        from diffusers import AutoencoderKL

        parts.vae = AutoencoderKL.from_pretrained(path / "vae", use_safetensors=True)
    if "text_encoder" in components:
        transformers = needs_transformers(f"{path / 'text_encoder'}")
        parts.text_encoder = transformers.CLIPTextModel.from_pretrained(path / "text_encoder", use_safetensors=True)
        parts.tokenizer = transformers.CLIPTokenizer.from_pretrained(path / "tokenizer")
    for model in (parts.vae, parts.text_encoder):
        if model is not None:
            model.eval().requires_grad_(False)
    return parts


# --- the built-in tiny-sd pipeline ---------------------------------------------------------------

def _byte_vocabulary() -> dict[str, int]:
    """A CLIP BPE vocabulary with no merges: each of the 256 bytes (in CLIP's printable byte
    alphabet), alone and at a word's end, and the start/end tokens. Any text tokenises."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    alphabet = [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]
    tokens = [*alphabet, *(c + "</w>" for c in alphabet), "<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}


TINY_SD_TOKENS = 32  # the tiny text encoder's context (CLIP's is 77)


def write_tiny_sd(folder: str | os.PathLike, seed: int = 0, resolution: int = 16) -> Path:
    """Write ``tiny-sd``: a Stable Diffusion pipeline folder with seeded random components of the
    SD-1.x families (AutoencoderKL with 2x downsampling, a cross-attention UNet2DConditionModel, a
    2-layer CLIPTextModel with a byte-level tokenizer, SD's scaled-linear schedule), about 1.0M
    parameters in all, for ``resolution`` x ``resolution`` RGB images. Runs anywhere in seconds."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    transformers = needs_transformers("the builtin tiny-sd pipeline")
    folder = Path(folder)
    vocab = _byte_vocabulary()
    with seeded(seed):
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            norm_num_groups=8, layers_per_block=1, sample_size=resolution)
        unet = UNet2DConditionModel(sample_size=resolution // 2, in_channels=4, out_channels=4, layers_per_block=1,
                                    block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32,
                                    attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
        text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=TINY_SD_TOKENS, bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]))
    (folder / "tokenizer").mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    (folder / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": TINY_SD_TOKENS}))
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer")
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, set_alpha_to_one=False,
                              steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
