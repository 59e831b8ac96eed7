"""Tiny diffusers models (random init) of each supported family, with matching example inputs."""

import torch


def tiny_unet2d(seed=0, width=1.0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(int(8 * width), int(16 * width)), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4)


def tiny_unet2d_condition(seed=0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=8, in_channels=2, out_channels=2, layers_per_block=1,
                                block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=8,
                                attention_head_dim=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def tiny_dit(seed=0):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    # out_channels = 2 * in_channels: learned variance, as the DiT checkpoints; epsilon is the first half
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=2, out_channels=4,
                                 num_layers=1, sample_size=4, patch_size=2, num_embeds_ada_norm=10)


def example_inputs(kind, batch=2, dtype=torch.float64, seed=0):
    """(x_t, timesteps, model_kwargs) for a tiny model of ``kind``."""
    g = torch.Generator().manual_seed(seed)
    shape = {"unet2d": (1, 8, 8), "unet2d_condition": (2, 8, 8), "dit": (2, 4, 4)}[kind]
    x = torch.randn(batch, *shape, generator=g, dtype=dtype)
    t = torch.randint(0, 1000, (batch,), generator=g).to(dtype)
    kw = {}
    if kind == "unet2d_condition":
        kw["encoder_hidden_states"] = torch.randn(batch, 3, 8, generator=g, dtype=dtype)
    if kind == "dit":
        kw["class_labels"] = torch.randint(0, 10, (batch,), generator=g)
    return x, t, kw


BUILDERS = {"unet2d": tiny_unet2d, "unet2d_condition": tiny_unet2d_condition, "dit": tiny_dit}
