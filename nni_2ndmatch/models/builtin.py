"""Built-in architectures (seeded random weights, and the pretrained digits teacher), what a model
is conditioned on, and example inputs of the right shapes.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..scoped import seeded, seeded_generator
from .digits import MNIST_RESOLUTION, RESOLUTION, load_digits_teacher, load_mnist_teacher


def _width(channels: tuple[int, ...], width: float, groups: int) -> tuple[int, ...]:
    return tuple(max(groups, int(round(c * width / groups)) * groups) for c in channels)


def tiny_unet(width: float = 1.0) -> nn.Module:
    """A small pixel-space DDPM U-Net for 1x16x16 images (the built-in digits default)."""
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=16, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=_width((32, 64, 64), width, 8), norm_num_groups=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None)


def ddpm_cifar10(width: float = 1.0) -> nn.Module:
    """The layout of google/ddpm-cifar10-32 (35.7M parameters at width 1), randomly initialised."""
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                       block_out_channels=_width((128, 256, 256, 256), width, 32), norm_num_groups=32,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                       attention_head_dim=None)


def tiny_unet_cond(width: float = 1.0) -> nn.Module:
    """A small text-conditional U-Net (cross-attention on 32-d token embeddings) for 1x16x16 images."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=16, in_channels=1, out_channels=1, layers_per_block=1,
                                block_out_channels=_width((32, 64), width, 8), norm_num_groups=8,
                                cross_attention_dim=32, attention_head_dim=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def tiny_dit(width: float = 1.0) -> nn.Module:
    """A small class-conditional DiT (10 classes, 2x2 patches) for 1x16x16 images."""
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=max(2, int(round(16 * width))),
                                 in_channels=1, out_channels=1, num_layers=2, sample_size=16, patch_size=2,
                                 num_embeds_ada_norm=10)


def digits_teacher(width: float = 1.0) -> nn.Module:
    """The shipped DDPM trained on the digits (1x8x8, the tiny-unet layout): pretrained weights."""
    if width != 1.0:
        raise ValueError(f"width={width!r} is not allowed for the pretrained builtin 'digits-teacher'; allowed: 1.0")

    return load_digits_teacher()


def digits_unet() -> nn.Module:
    """The teacher's architecture: the tiny-unet layout (32, 64, 64 channels, attention at 4x4)
    for 1x8x8 images; 1.1M parameters."""
    model = tiny_unet()
    model.register_to_config(sample_size=RESOLUTION)
    return model


def mnist_unet() -> nn.Module:
    """The MNIST teacher's architecture: the tiny-unet layout for 1x28x28 images (28, 14, 7)."""
    model = tiny_unet()
    model.register_to_config(sample_size=MNIST_RESOLUTION)
    return model


def mnist_teacher(width: float = 1.0) -> nn.Module:
    """The shipped DDPM trained on MNIST (1x28x28, the tiny-unet layout): pretrained weights."""
    if width != 1.0:
        raise ValueError(f"width={width!r} is not allowed for the pretrained builtin 'mnist-teacher'; allowed: 1.0")
    return load_mnist_teacher()


BUILTIN_MODELS: dict[str, Callable[[float], nn.Module]] = {
    "digits-teacher": digits_teacher, "mnist-teacher": mnist_teacher, "tiny-unet": tiny_unet,
    "tiny-unet-cond": tiny_unet_cond, "tiny-dit": tiny_dit, "ddpm-cifar10": ddpm_cifar10}
#: Built-in pipelines (models.tiny_pipelines): a teacher with its VAE, text encoders and schedule.
BUILTIN_PIPELINES = ("tiny-sd", "tiny-sdxl", "tiny-sd3")


def diffusers_class_name(model: nn.Module) -> str:
    """The name of the diffusers class ``model`` is, or derives from (a pruned student's dense class)."""
    return next((c.__name__ for c in type(model).__mro__ if c.__module__.startswith("diffusers.")),
                type(model).__name__)


def is_dit(model: nn.Module) -> bool:
    """A diffusers DiT: its input is ``hidden_states`` and it is conditioned on class labels."""
    return diffusers_class_name(model) == "DiTTransformer2DModel"


def is_sd3(model: nn.Module) -> bool:
    """SD3's joint (MMDiT) transformer: its input is ``hidden_states``, and it is conditioned on
    text tokens (``encoder_hidden_states``) and a pooled text embedding (``pooled_projections``)."""
    return diffusers_class_name(model) == "SD3Transformer2DModel"


def first_input(model: nn.Module) -> str:
    """The keyword of a diffusers model's noisy input: ``hidden_states`` (transformers) or ``sample``."""
    return "hidden_states" if is_dit(model) or is_sd3(model) else "sample"


def conditioning_of(model: nn.Module) -> tuple[str, int] | None:
    """What a model is conditioned on besides the timestep: ("class_labels", number of classes)
    for a class-conditional DiT, ("encoder_hidden_states", embedding width) for a cross-attention
    U-Net or SD3's transformer, None for an unconditional model."""
    config = getattr(model, "config", None)
    if is_dit(model):
        return "class_labels", int(config.num_embeds_ada_norm)
    if is_sd3(model):
        return "encoder_hidden_states", int(config.joint_attention_dim)
    dim = getattr(config, "cross_attention_dim", None)
    if dim:
        return "encoder_hidden_states", int(dim if isinstance(dim, int) else dim[0])
    return None


def example_conditioning(model: nn.Module, batch: int, seed: int = 0) -> dict[str, Tensor]:
    """Seeded stand-in conditioning of the kind ``model`` takes, as keyword arguments for a batch
    of ``batch``: {} for an unconditional model, random ``class_labels`` for a class-conditional
    DiT, 4 random token embeddings as ``encoder_hidden_states`` for a cross-attention U-Net or SD3
    (with SDXL's ``text_embeds`` and ``time_ids``, SD3's ``pooled_projections``)."""
    kind = conditioning_of(model)
    if kind is None:
        return {}
    g = seeded_generator(seed)
    key, size = kind
    if key == "class_labels":
        return {key: torch.randint(0, size, (batch,), generator=g)}
    return {key: torch.randn(batch, 4, size, generator=g), **added_conditions(model.config, batch, g)}


def added_conditions(config: Any, batch: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Stand-ins for the pooled text conditioning: SDXL's ``text_embeds`` (random) and ``time_ids``
    (a square image at the model's sample size, uncropped) where the U-Net takes them
    (``addition_embed_type: text_time``), SD3's ``pooled_projections`` (random); else {}."""
    if getattr(config, "pooled_projection_dim", None) and getattr(config, "joint_attention_dim", None):
        return {"pooled_projections": torch.randn(batch, config.pooled_projection_dim, generator=generator)}
    if getattr(config, "addition_embed_type", None) != "text_time":
        return {}
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    size = 8.0 * (config.sample_size if isinstance(config.sample_size, int) else config.sample_size[0])
    return {"text_embeds": torch.randn(batch, pooled, generator=generator),
            "time_ids": torch.tensor([[size, size, 0.0, 0.0, size, size]] * batch)}


def build_builtin(name: str, width: float = 1.0, seed: int = 0) -> nn.Module:
    """A built-in architecture with weights initialised from ``seed`` (``digits-teacher``: pretrained)."""
    if name not in BUILTIN_MODELS:
        raise ValueError(f"builtin={name!r} is unknown; available: {', '.join(BUILTIN_MODELS)}")
    with seeded(seed):
        return BUILTIN_MODELS[name](width)


def default_example_inputs(model: nn.Module, batch: int = 1) -> dict[str, Any]:
    """Forward arguments of the right shapes for a diffusers model, built from its config (flat:
    an SDXL U-Net's ``text_embeds`` and ``time_ids`` beside the others, see ``method.forward_kwargs``)."""
    cfg = model.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    inputs: dict[str, Any] = {first_input(model): torch.randn(batch, cfg.in_channels, size, size),
                              "timestep": torch.ones(batch)}
    kind = conditioning_of(model)
    if kind is not None and kind[0] == "encoder_hidden_states":
        inputs["encoder_hidden_states"] = torch.randn(batch, 4, kind[1])
    if is_dit(model):
        inputs["class_labels"] = torch.zeros(batch, dtype=torch.long)
    inputs.update(added_conditions(cfg, batch))
    return inputs
