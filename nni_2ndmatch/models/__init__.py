"""Models: the built-in architectures and digits assets, loading and saving diffusers models."""

from .builtin import (
    BUILTIN_MODELS,
    BUILTIN_PIPELINES,
    build_builtin,
    conditioning_of,
    default_example_inputs,
    diffusers_class_name,
    digits_unet,
    example_conditioning,
    first_input,
    is_dit,
    is_sd3,
    tiny_dit,
    tiny_unet,
    tiny_unet_cond,
)
from .loading import (
    SUPPORTED_CLASSES,
    count_params,
    load_diffusers_model,
    load_hub_model,
    model_class,
    save_diffusers_model,
)
from .pipelines import (
    PipelineParts,
    is_pipeline_folder,
    load_pipeline_parts,
    pipeline_denoiser,
    training_scheduler,
)
from .tiny_pipelines import TINY_PIPELINES, write_tiny_sd, write_tiny_sd3, write_tiny_sdxl

__all__ = [
    "BUILTIN_MODELS", "BUILTIN_PIPELINES", "PipelineParts", "SUPPORTED_CLASSES", "build_builtin", "conditioning_of",
    "count_params", "default_example_inputs", "diffusers_class_name", "digits_unet", "example_conditioning",
    "first_input", "is_dit", "is_sd3", "is_pipeline_folder", "load_diffusers_model", "load_hub_model",
    "load_pipeline_parts", "model_class",
    "pipeline_denoiser", "save_diffusers_model", "tiny_dit", "tiny_unet", "tiny_unet_cond", "training_scheduler",
    "TINY_PIPELINES", "write_tiny_sd", "write_tiny_sd3", "write_tiny_sdxl",
]
