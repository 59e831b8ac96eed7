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


def tiny_sd_pipeline(folder, prediction_type="epsilon", seed=0):
    """A tiny Stable Diffusion pipeline folder built here from configs (AutoencoderKL, a cross-attention
    UNet2DConditionModel, a CLIPTextModel and a character-level CLIP vocabulary), for 3x8x8 images."""
    from pathlib import Path

    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    words = folder / "vocabulary"
    vocab = _char_vocabulary(words, 24)
    vae = _tiny_vae(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=8, intermediate_size=16,
                                                num_hidden_layers=1, num_attention_heads=2,
                                                max_position_embeddings=24, bos_token_id=len(vocab) - 2,
                                                eos_token_id=len(vocab) - 1, pad_token_id=len(vocab) - 1))
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction_type, clip_sample=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(words),
                                   unet=tiny_unet2d_condition(seed), scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder / "pipeline", safe_serialization=True)
    return folder / "pipeline"


def _tiny_vae(seed=0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=2, block_out_channels=(8, 8),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=4, layers_per_block=1, sample_size=8)


def tiny_dit_pipeline(folder, seed=0):
    """A tiny latent class-conditional DiTPipeline folder (10 classes) for 3x8x8 images."""
    from pathlib import Path

    from diffusers import DDIMScheduler, DiTPipeline

    pipe = DiTPipeline(transformer=tiny_dit(seed), vae=_tiny_vae(seed), scheduler=DDIMScheduler(),
                       id2label={i: str(i) for i in range(10)})
    pipe.save_pretrained(Path(folder), safe_serialization=True)
    return Path(folder)


def captioned_images(folder, n=8, size=8):
    """``n`` random RGB PNGs and a metadata.jsonl captioning ("picture 0", ...) and labelling (0, ...) each."""
    import json
    from pathlib import Path

    import numpy as np
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"picture {i % 3}", "label": i % 3}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def _char_vocabulary(folder, context):
    """A character-level CLIP vocabulary (printable ASCII, which CLIP's byte alphabet keeps as it is)."""
    import json

    chars = [chr(c) for c in range(33, 127)]
    vocab = {t: i for i, t in enumerate([*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"])}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": context}))
    return vocab


def tiny_clip(folder):
    """A tiny CLIPModel (16x16 images, 8-d projections) and its CLIPProcessor, saved in ``folder``."""
    from pathlib import Path

    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = Path(folder)
    vocab = _char_vocabulary(folder / "vocabulary", 24)
    torch.manual_seed(0)
    text = dict(vocab_size=len(vocab), hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=24, bos_token_id=len(vocab) - 2, eos_token_id=len(vocab) - 1,
                pad_token_id=len(vocab) - 1)
    vision = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(
        folder / "clip", safe_serialization=True)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
                  tokenizer=CLIPTokenizer.from_pretrained(folder / "vocabulary")).save_pretrained(folder / "clip")
    return folder / "clip"


def tiny_feature_onnx(path, features=6):
    """An ONNX feature network with FID's interface: uint8 images [N, 3, H, W] -> [N, features]."""

    class Features(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = torch.nn.Conv2d(3, features, 3)

        def forward(self, x):
            return torch.tanh(self.conv(x.float() / 255)).mean((2, 3))

    net = Features().eval()
    torch.onnx.export(net, (torch.zeros(2, 3, 8, 8, dtype=torch.uint8),), str(path), input_names=["images"],
                      dynamic_shapes={"x": {0: torch.export.Dim("n"), 2: torch.export.Dim("h", min=3),
                                            3: torch.export.Dim("w", min=3)}}, dynamo=True)
    return net
