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
from ..method.schedule import PREDICTION_TYPES, is_flow_matching

PIPELINE_INDEX = "model_index.json"
DENOISERS = ("unet", "transformer")
#: The components a run loads besides the denoiser, and the classes allowed for each.
FROZEN_PARTS = {"vae": ("AutoencoderKL",), "text_encoder": ("CLIPTextModel", "CLIPTextModelWithProjection"),
                "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"), "text_encoder_2": ("CLIPTextModelWithProjection",),
                "tokenizer_2": ("CLIPTokenizer", "CLIPTokenizerFast"), "text_encoder_3": ("T5EncoderModel",),
                "tokenizer_3": ("T5Tokenizer", "T5TokenizerFast")}
#: Pipeline classes of the SDXL and SD3 families a run takes, and the keyword their denoiser takes
#: the pooled text embedding as (the others of these families are refused by name).
POOLED_PIPELINES = {"StableDiffusionXLPipeline": "text_embeds", "StableDiffusion3Pipeline": "pooled_projections"}
#: SD3's T5 context at sampling (its pipeline's default max_sequence_length), zeros without T5.
SD3_T5_TOKENS = 256
#: Pipeline families refused by name (model_index.json's ``_class_name`` starts with the key), before
#: their components are looked at. SDXL's and SD3's text-to-image pipelines are taken (POOLED_PIPELINES); their kin
#: are not.
UNSUPPORTED_FAMILIES = {
    "StableDiffusionXLImg2Img": "an SDXL refiner or img2img pipeline",
    "StableDiffusionXLInpaint": "SDXL inpainting (a 9-channel U-Net)",
    "StableDiffusionXL": "an SDXL variant other than StableDiffusionXLPipeline",
    "StableDiffusion3": "an SD3 variant other than StableDiffusion3Pipeline",
    "Flux": "Flux", "UnCLIP": "unCLIP", "StableUnCLIP": "unCLIP", "Kandinsky": "Kandinsky (a prior cascade)",
    "Wuerstchen": "Wuerstchen (a cascade)", "StableCascade": "Stable Cascade (a cascade)",
    "IF": "DeepFloyd IF (a cascade)", "TextToVideo": "video", "VideoToVideo": "video",
    "StableVideoDiffusion": "video", "AnimateDiff": "video", "I2VGen": "video", "CogVideoX": "video",
    "LTX": "video", "HunyuanVideo": "video", "Wan": "video", "Mochi": "video", "PixArt": "PixArt (a T5 text encoder)",
    "Sana": "Sana", "AuraFlow": "AuraFlow", "Lumina": "Lumina", "Kolors": "Kolors",
}
SUPPORTED_FAMILIES = ("Stable Diffusion 1.x/2.x (StableDiffusionPipeline and its img2img/inpaint kin)",
                      "SDXL (StableDiffusionXLPipeline)", "SD3 (StableDiffusion3Pipeline, T5 optional)",
                      "DiT (DiTPipeline)", "pixel-space DDPM/DDIM pipelines (DDPMPipeline, DDIMPipeline)")
#: Components of pipelines whose conditioning the finetuning does not provide (unCLIP, LDM's VQ-VAE, IP-Adapters).
UNSUPPORTED_PARTS = ("vqvae", "image_encoder", "prior", "image_noising_scheduler")


def is_pipeline_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / PIPELINE_INDEX).is_file()


def pipeline_components(path: str | os.PathLike) -> dict[str, str]:
    """The components a pipeline folder's model_index.json names, with their class names."""
    index = read_json_object(Path(path) / PIPELINE_INDEX)
    return {k: str(v[1]) for k, v in index.items()
            if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[0] is not None}


def null_components(path: str | os.PathLike) -> dict[str, None]:
    """The components a pipeline folder's model_index.json saves as [null, null], as None: what
    ``from_pretrained`` must be given explicitly where the pipeline class does not list them as
    optional (SD3 without T5: text_encoder_3, tokenizer_3)."""
    index = read_json_object(Path(path) / PIPELINE_INDEX)
    return {k: None for k, v in index.items() if not k.startswith("_") and v in ([None, None], (None, None))}


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
        if class_name not in POOLED_PIPELINES else None
    if family is not None:
        raise ValueError(f"{index_file}: _class_name {class_name} is {family}, which is not supported yet; "
                         f"supported: {'; '.join(SUPPORTED_FAMILIES)}")
    import diffusers

    if not isinstance(getattr(diffusers, class_name, None), type):  # a custom pipeline.py: neither run nor saved
        raise ValueError(f"{index_file}: _class_name {class_name} is not a diffusers pipeline class (a custom "
                         f"pipeline's code is not loaded or carried); supported: {'; '.join(SUPPORTED_FAMILIES)}")
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
                         "tokenizer_2, text_encoder_3 (T5EncoderModel) and tokenizer_3 (Stable Diffusion 1.x/2.x, "
                         "SDXL, SD3 and DiT layouts)")
    for name, allowed in FROZEN_PARTS.items():
        if class_name == "StableDiffusion3Pipeline" and name == "text_encoder":
            allowed = ("CLIPTextModelWithProjection",)  # SD3 pools both CLIP encoders' projections
        if name in components and components[name] not in allowed:
            raise ValueError(f"{index_file}: {name} is {components[name]}; allowed: {', '.join(allowed)}")
    if "text_encoder" in components and "vae" not in components:
        raise ValueError(f"{index_file}: a text_encoder without a vae (a pixel-space text-to-image pipeline) is not "
                         "supported; allowed: Stable Diffusion layouts (vae, text_encoder, tokenizer)")
    if class_name in POOLED_PIPELINES and "text_encoder" in components and "text_encoder_2" not in components:
        raise ValueError(f"{index_file}: {class_name} has no text_encoder_2; it conditions on both CLIP encoders' "
                         "states and pools the second's; allowed: text_encoder and text_encoder_2 with tokenizers")
    if "text_encoder_2" in components and "text_encoder" not in components:
        raise ValueError(f"{index_file}: text_encoder_2 without text_encoder is an SDXL refiner, which is not "
                         "supported; allowed: the SDXL base layout (text_encoder and text_encoder_2)")
    if "text_encoder_3" in components and "text_encoder_2" not in components:
        raise ValueError(f"{index_file}: text_encoder_3 without text_encoder_2 is not a layout the run knows; "
                         "allowed: SD3's (text_encoder, text_encoder_2, and optionally text_encoder_3)")
    for encoder, tokenizer in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"),
                               ("text_encoder_3", "tokenizer_3")):
        if (encoder in components) != (tokenizer in components):
            raise ValueError(f"{index_file}: a {encoder} needs its {tokenizer} and a {tokenizer} its {encoder}; "
                             f"components: {', '.join(components)}")
    flow = is_flow_matching(training_scheduler(path))  # the schedule is readable, its prediction type supported
    denoiser = components[denoisers[0]].removeprefix("Pruned")  # a pruned student is its dense class's kind
    if (denoiser in FLOW_DENOISERS) != flow:
        file = path / "scheduler" / "scheduler_config.json"
        scheduler = read_json_object(file).get("_class_name") if file.is_file() else "none: the default DDPM one"
        raise ValueError(f"{index_file}: the scheduler ({scheduler}) does not match the objective "
                         f"{denoiser} was trained with; allowed: a flow-matching scheduler "
                         f"(FlowMatchEulerDiscreteScheduler) for {', '.join(FLOW_DENOISERS)}, a DDPM-family one "
                         "(with betas) for the others")
    return denoisers[0]


#: Denoisers trained by flow matching (their pipelines' scheduler: FlowMatchEulerDiscreteScheduler).
FLOW_DENOISERS = ("SD3Transformer2DModel",)


def training_scheduler(path: str | os.PathLike) -> Any:
    """The training schedule of a pipeline: its scheduler's betas, number of steps and prediction
    type (``DDPMScheduler.from_config``, as diffusers' training scripts do), or a flow-matching
    scheduler of its config (SD3's; its ``shift`` applies), or the default schedule when the
    pipeline has no scheduler config."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    from ..method import default_scheduler

    file = Path(path) / "scheduler" / "scheduler_config.json"
    if not file.is_file():
        return default_scheduler()
    config = read_json_object(file)
    if str(config.get("_class_name", "")).startswith("FlowMatch"):
        if config.get("use_dynamic_shifting"):
            raise ValueError(f"{file}: use_dynamic_shifting=true (a shift that depends on the image size, as Flux's) "
                             "is not supported; allowed: a fixed shift (SD3's)")
        return FlowMatchEulerDiscreteScheduler.from_config(config)
    if "beta_schedule" not in config and config.get("trained_betas") is None:
        raise ValueError(f"{file}: {config.get('_class_name')} has no beta schedule; allowed: the DDPM family "
                         "(DDPM, DDIM, PNDM, Euler, DPM-Solver ... schedulers with betas), or flow matching "
                         "(FlowMatchEulerDiscreteScheduler)")
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
    ``text_encoder_2`` and ``tokenizer_2`` but for SDXL and SD3, ``text_encoder_3`` and
    ``tokenizer_3`` but for SD3 with T5. ``zero_empty_prompt``: the pipeline's
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
    text_encoder_3: nn.Module | None = None
    tokenizer_3: Any = None
    zero_empty_prompt: bool = False
    pooled_key: str | None = None  # the keyword of the pooled text embedding (POOLED_PIPELINES), or None
    joint_width: int = 0  # SD3: the transformer's joint_attention_dim (the text tokens' width)
    t5_tokens: int = 0  # SD3: T5's tokens after the CLIP ones (SD3_T5_TOKENS; zeros without T5)
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
    index = read_json_object(path / PIPELINE_INDEX)
    pooled_key = POOLED_PIPELINES.get(str(index.get("_class_name")))
    zero_empty = bool(index.get("force_zeros_for_empty_prompt", pooled_key == "text_embeds"))  # SDXL's default
    parts = PipelineParts(path, denoiser, training_scheduler(path), zero_empty_prompt=zero_empty,
                          pooled_key=pooled_key)
    if pooled_key == "pooled_projections":
        parts.joint_width = int(read_json_object(path / denoiser / "config.json").get("joint_attention_dim", 0))
        parts.t5_tokens = SD3_T5_TOKENS
    if "vae" in components:
        from diffusers import AutoencoderKL

        parts.vae = AutoencoderKL.from_pretrained(path / "vae", use_safetensors=True)
    for suffix in ("", "_2", "_3"):
        if "text_encoder" + suffix in components:
            transformers = needs_transformers(f"{path / ('text_encoder' + suffix)}")
            encoder = getattr(transformers, components["text_encoder" + suffix])  # a class FROZEN_PARTS allows
            setattr(parts, "text_encoder" + suffix, encoder.from_pretrained(path / ("text_encoder" + suffix),
                                                                            use_safetensors=True))
            tokenizer = getattr(transformers, components["tokenizer" + suffix])
            setattr(parts, "tokenizer" + suffix, tokenizer.from_pretrained(path / ("tokenizer" + suffix)))
    for model in (parts.vae, parts.text_encoder, parts.text_encoder_2, parts.text_encoder_3):
        if model is not None:
            model.eval().requires_grad_(False)
    return parts
