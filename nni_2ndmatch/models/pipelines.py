"""Diffusers pipeline folders as teachers: what a run takes from one (its denoiser, its training
noise schedule, and for a latent pipeline the frozen VAE, and the text encoders and tokenizers of a
text-to-image one: Stable Diffusion 1.x/2.x, or SDXL with its second text encoder).

Only JSON and safetensors are read; no component's code comes from the folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..files import read_json_object
from ..method.schedule import PREDICTION_TYPES

PIPELINE_INDEX = "model_index.json"
DENOISERS = ("unet", "transformer")
#: The components a run loads besides the denoiser, and the classes allowed for each.
FROZEN_PARTS = {"vae": ("AutoencoderKL",), "text_encoder": ("CLIPTextModel",),
                "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"), "text_encoder_2": ("CLIPTextModelWithProjection",),
                "tokenizer_2": ("CLIPTokenizer", "CLIPTokenizerFast")}
#: The pipeline classes of the SDXL family a run takes (the others of that family are refused by name).
SDXL_PIPELINES = ("StableDiffusionXLPipeline",)
#: Pipeline families refused by name (model_index.json's ``_class_name`` starts with the key), before
#: their components are looked at. SDXL's text-to-image pipeline is taken (SDXL_PIPELINES); its kin are not.
UNSUPPORTED_FAMILIES = {
    "StableDiffusionXLImg2Img": "an SDXL refiner or img2img pipeline",
    "StableDiffusionXLInpaint": "SDXL inpainting (a 9-channel U-Net)",
    "StableDiffusionXL": "an SDXL variant other than StableDiffusionXLPipeline", "StableDiffusion3": "SD3",
    "Flux": "Flux", "UnCLIP": "unCLIP", "StableUnCLIP": "unCLIP", "Kandinsky": "Kandinsky (a prior cascade)",
    "Wuerstchen": "Wuerstchen (a cascade)", "StableCascade": "Stable Cascade (a cascade)",
    "IF": "DeepFloyd IF (a cascade)", "TextToVideo": "video", "VideoToVideo": "video",
    "StableVideoDiffusion": "video", "AnimateDiff": "video", "I2VGen": "video", "CogVideoX": "video",
    "LTX": "video", "HunyuanVideo": "video", "Wan": "video", "Mochi": "video", "PixArt": "PixArt (a T5 text encoder)",
    "Sana": "Sana", "AuraFlow": "AuraFlow", "Lumina": "Lumina", "Kolors": "Kolors",
}
SUPPORTED_FAMILIES = ("Stable Diffusion 1.x/2.x (StableDiffusionPipeline and its img2img/inpaint kin)",
                      "SDXL (StableDiffusionXLPipeline)",
                      "DiT (DiTPipeline)", "pixel-space DDPM/DDIM pipelines (DDPMPipeline, DDIMPipeline)")
#: Components of pipelines whose conditioning the finetuning does not provide (SD3, unCLIP, LDM's VQ-VAE).
UNSUPPORTED_PARTS = ("text_encoder_3", "tokenizer_3", "vqvae", "image_encoder", "prior", "image_noising_scheduler")


def is_pipeline_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / PIPELINE_INDEX).is_file()


def pipeline_components(path: str | os.PathLike) -> dict[str, str]:
    """The components a pipeline folder's model_index.json names, with their class names."""
    index = read_json_object(Path(path) / PIPELINE_INDEX)
    return {k: str(v[1]) for k, v in index.items()
            if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[0] is not None}


def pipeline_denoiser(path: str | os.PathLike) -> str:
    """The component name of a pipeline's denoiser ("unet" or "transformer"), after checking that
    the run can train it: a VAE only of the AutoencoderKL kind, text encoders only CLIP ones with
    their tokenizers (a second one only after a first, as SDXL), and a scheduler with a supported
    prediction type.
    Otherwise a ValueError naming the file, the entry and what is allowed."""
    path = Path(path)
    index_file = path / PIPELINE_INDEX
    class_name = str(read_json_object(index_file).get("_class_name", ""))
    family = next((f for prefix, f in UNSUPPORTED_FAMILIES.items() if class_name.startswith(prefix)), None) \
        if class_name not in SDXL_PIPELINES else None
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
                         "text_encoder (CLIPTextModel) and tokenizer, text_encoder_2 (CLIPTextModelWithProjection) and "
                         "tokenizer_2 (Stable Diffusion 1.x/2.x, SDXL and DiT layouts)")
    for name, allowed in FROZEN_PARTS.items():
        if name in components and components[name] not in allowed:
            raise ValueError(f"{index_file}: {name} is {components[name]}; allowed: {', '.join(allowed)}")
    if "text_encoder" in components and "vae" not in components:
        raise ValueError(f"{index_file}: a text_encoder without a vae (a pixel-space text-to-image pipeline) is not "
                         "supported; allowed: Stable Diffusion layouts (vae, text_encoder, tokenizer)")
    if "text_encoder_2" in components and "text_encoder" not in components:
        raise ValueError(f"{index_file}: text_encoder_2 without text_encoder is an SDXL refiner, which is not "
                         "supported; allowed: the SDXL base layout (text_encoder and text_encoder_2)")
    for encoder, tokenizer in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        if (encoder in components) != (tokenizer in components):
            raise ValueError(f"{index_file}: a {encoder} needs its {tokenizer} and a {tokenizer} its {encoder}; "
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
    pixel-space pipeline; ``text_encoder`` and ``tokenizer`` are None without text conditioning,
    ``text_encoder_2`` and ``tokenizer_2`` but for SDXL. ``zero_empty_prompt``: the pipeline's
    unconditional embedding (guidance's, and a dropped caption's) is zeros, not the empty prompt's
    (SDXL's ``force_zeros_for_empty_prompt``)."""

    path: Path
    denoiser: str
    scheduler: Any
    vae: nn.Module | None = None
    text_encoder: nn.Module | None = None
    tokenizer: Any = None
    text_encoder_2: nn.Module | None = None
    tokenizer_2: Any = None
    zero_empty_prompt: bool = False
    keep: Any = None  # what must live as long as the parts (the temporary folder of a builtin pipeline)

    @property
    def latent(self) -> bool:
        return self.vae is not None

    @property
    def frozen(self) -> dict[str, Any]:
        """The frozen components by their pipeline names (those the pipeline has)."""
        return {name: getattr(self, name) for name in FROZEN_PARTS if getattr(self, name) is not None}


def needs_transformers(what: str) -> Any:
    try:
        import transformers
    except ImportError:
        raise ValueError(f"{what} needs the transformers package: pip install 'nni-2ndmatch[text]' "
                         "(or pip install transformers)") from None
    return transformers


def load_pipeline_parts(path: str | os.PathLike) -> PipelineParts:
    """The denoiser's name, the training schedule and the frozen VAE / text encoders / tokenizers
    of a pipeline folder (safetensors weights only), in eval mode without gradients."""
    path = Path(path)
    denoiser = pipeline_denoiser(path)
    components = pipeline_components(path)
    zero_empty = bool(read_json_object(path / PIPELINE_INDEX).get("force_zeros_for_empty_prompt",
                                                                  "text_encoder_2" in components))  # SDXL's default
    parts = PipelineParts(path, denoiser, training_scheduler(path), zero_empty_prompt=zero_empty)
    if "vae" in components:
        from diffusers import AutoencoderKL

        parts.vae = AutoencoderKL.from_pretrained(path / "vae", use_safetensors=True)
    if "text_encoder" in components:
        transformers = needs_transformers(f"{path / 'text_encoder'}")
        parts.text_encoder = transformers.CLIPTextModel.from_pretrained(path / "text_encoder", use_safetensors=True)
        parts.tokenizer = transformers.CLIPTokenizer.from_pretrained(path / "tokenizer")
    if "text_encoder_2" in components:
        parts.text_encoder_2 = transformers.CLIPTextModelWithProjection.from_pretrained(path / "text_encoder_2",
                                                                                       use_safetensors=True)
        parts.tokenizer_2 = transformers.CLIPTokenizer.from_pretrained(path / "tokenizer_2")
    for model in (parts.vae, parts.text_encoder, parts.text_encoder_2):
        if model is not None:
            model.eval().requires_grad_(False)
    return parts
