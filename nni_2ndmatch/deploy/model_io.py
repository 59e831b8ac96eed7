"""What a deployed model takes and returns: loading a model folder, the input contract, and the
wrapper whose positional forward gives every backend the same stable input names.

Contract: ``sample`` [B, C, H, W] float32, ``timestep`` [B] float32 (one value per sample, sharing
the batch axis: a Python-number timestep would be baked into an exported graph as a constant),
then the conditioning inputs of conditional models: ``encoder_hidden_states`` [B, S, D] float32,
``class_labels`` [B] int64 (for DiT up to its null class), for an SDXL U-Net ``text_embeds`` [B, P]
and ``time_ids`` [B, 6] float32 (its ``added_cond_kwargs``), for SD3's transformer
``pooled_projections`` [B, P] float32.
One output, ``out``: the model's full prediction (for DiT with learned variance, 2*C channels;
epsilon is the first C; for SD3 the velocity), always float32.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..method import forward_kwargs
from ..models import conditioning_of, diffusers_class_name, first_input, is_dit, is_sd3
from ..pruning import macs_params as model_macs_params
from ..scoped import seeded_generator
from ..utils import is_integer
from .errors import DeployError

OUTPUT_NAME = "out"
#: Timesteps are drawn from [0, NUM_TIMESTEPS) for random inputs.
NUM_TIMESTEPS = 1000
#: Text length of ``encoder_hidden_states`` unless told otherwise: CLIP's 77 tokens (SD 1.x/2.x, SDXL)
DEFAULT_SEQ_LEN = 77
#: ... and SD3's: 77 CLIP tokens, then 256 of T5 (zeros without T5), as StableDiffusion3Pipeline feeds
SD3_SEQ_LEN = 77 + 256


@dataclass(frozen=True)
class InputSpec:
    """One model input; ``shape`` excludes the batch axis; ``high``: int inputs lie in [0, high)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    high: int | None = None

    def to_json(self, batch: int | str = "batch") -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": [batch, *self.shape]}


def load_model(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """A pruned-student folder or a diffusers folder (detected), in eval mode, and a description."""
    path = Path(path)
    if not path.is_dir():
        raise DeployError(f"model folder {str(path)!r} does not exist or is not a folder")
    if not any((path / name).is_file() for name in ("config.json", "model_index.json")):  # before diffusers loads
        raise DeployError(f"cannot load model folder {str(path)!r}: it has no config.json (a model folder) or "
                          "model_index.json (a pipeline folder)")
    from ..pruning.storage import is_pruned_folder, load_model_folder  # diffusers: only for a folder worth loading

    kind = "pruned" if is_pruned_folder(path) else "diffusers"
    try:
        model = load_model_folder(path)
    except (ValueError, OSError, KeyError) as e:
        raise DeployError(f"cannot load model folder {str(path)!r}: {e}") from None
    return model.eval(), {"source": str(path), "kind": kind, "class": type(model).__name__}


def check_seq_len(model: nn.Module, seq_len: int | None) -> None:
    """A DeployError when a text length is given for a model that takes no text (an export
    script's --seq-len would otherwise do nothing)."""
    if seq_len is not None and "encoder_hidden_states" not in [s.name for s in input_specs(model)]:
        raise DeployError(f"seq_len={seq_len!r} is not allowed: {type(model).__name__} takes no "
                          "encoder_hidden_states (text); leave it out")


def input_specs(model: nn.Module, seq_len: int | None = None) -> list[InputSpec]:
    """The inputs ``model`` is deployed with, in order (see the module docstring). ``seq_len``: the
    text tokens of ``encoder_hidden_states``; None: what the model's pipeline feeds (SD3's 333,
    else 77)."""
    if seq_len is None:
        seq_len = SD3_SEQ_LEN if is_sd3(model) else DEFAULT_SEQ_LEN
    if not is_integer(seq_len) or seq_len < 1:
        raise DeployError(f"seq_len={seq_len!r} is not allowed; it must be an integer >= 1")
    cfg = model.config
    name = diffusers_class_name(model)
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else tuple(cfg.sample_size)
    hw = (size, size) if isinstance(size, int) else size
    specs = [InputSpec("sample", "float32", (cfg.in_channels, *hw)), InputSpec("timestep", "float32", ())]
    sdxl = getattr(cfg, "addition_embed_type", None) == "text_time"
    for key in ("addition_embed_type", "encoder_hid_dim_type", "class_embed_type"):
        if getattr(cfg, key, None) is not None and not (sdxl and key == "addition_embed_type"):
            raise DeployError(f"{name} with {key}={getattr(cfg, key)!r} is not supported for export; "
                              f"allowed: {key}=None{' or text_time' if key == 'addition_embed_type' else ''}")
    kind = conditioning_of(model)
    if kind is not None and kind[0] == "encoder_hidden_states":
        specs.append(InputSpec("encoder_hidden_states", "float32", (seq_len, kind[1])))
    if is_sd3(model):
        specs.append(InputSpec("pooled_projections", "float32", (cfg.pooled_projection_dim,)))
    if sdxl:
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        specs += [InputSpec("text_embeds", "float32", (pooled,)), InputSpec("time_ids", "float32", (6,))]
    if is_dit(model) and cfg.num_embeds_ada_norm:  # with the null class of guidance, where the table has it
        table = next((m.embedding_table for m in model.modules() if type(m).__name__ == "LabelEmbedding"), None)
        high = table.num_embeddings if table is not None else cfg.num_embeds_ada_norm
        specs.append(InputSpec("class_labels", "int64", (), high=int(high)))
    elif getattr(cfg, "num_class_embeds", None):
        specs.append(InputSpec("class_labels", "int64", (), high=int(cfg.num_class_embeds)))
    return specs


class ExportWrapper(nn.Module):
    """Calls a diffusers model with keyword arguments from positional tensors; returns a float32
    tensor. With ``half``, floating inputs are cast to float16 inside (timestep stays float32:
    diffusers computes the timestep embedding in float32)."""

    def __init__(self, model: nn.Module, cond_names: list[str], half: bool = False):
        super().__init__()
        self.model, self.cond_names, self.half = model, list(cond_names), half
        self.first = first_input(model)

    def call(self, sample: Tensor, timestep: Tensor, *cond: Tensor) -> Tensor:
        if self.half:
            sample = sample.half()
            cond = tuple(c.half() if c.is_floating_point() else c for c in cond)
        kwargs = forward_kwargs(dict(zip(self.cond_names, cond)))
        out = self.model(**{self.first: sample}, timestep=timestep, **kwargs, return_dict=False)[0]
        return out.float()


class _Unconditional(ExportWrapper):
    def forward(self, sample: Tensor, timestep: Tensor) -> Tensor:
        return self.call(sample, timestep)


class _OneCondition(ExportWrapper):
    def forward(self, sample: Tensor, timestep: Tensor, cond: Tensor) -> Tensor:
        return self.call(sample, timestep, cond)


class _TwoConditions(ExportWrapper):
    def forward(self, sample: Tensor, timestep: Tensor, cond_a: Tensor, cond_b: Tensor) -> Tensor:
        return self.call(sample, timestep, cond_a, cond_b)


class _ThreeConditions(ExportWrapper):
    def forward(self, sample: Tensor, timestep: Tensor, cond_a: Tensor, cond_b: Tensor, cond_c: Tensor) -> Tensor:
        return self.call(sample, timestep, cond_a, cond_b, cond_c)


def wrap(model: nn.Module, specs: list[InputSpec], half: bool = False) -> ExportWrapper:
    """The positional wrapper for ``model`` taking ``specs`` (an explicit signature per arity, so
    that exporters see plain positional tensors)."""
    cond = [s.name for s in specs[2:]]
    cls = (_Unconditional, _OneCondition, _TwoConditions, _ThreeConditions)[len(cond)]
    return cls(model, cond, half).eval()


def random_inputs(specs: list[InputSpec], batch: int, seed: int = 0,
                  device: str | torch.device = "cpu") -> list[Tensor]:
    """Random inputs of the contract (seeded), created on ``device``; in a batch of several, an
    integer input's last item is its largest value (a DiT's null class, which guidance feeds), so
    checks always meet it beside a random one."""
    g = seeded_generator(seed)
    out = []
    for s in specs:
        if s.name == "timestep":
            t = torch.rand(batch, generator=g) * (NUM_TIMESTEPS - 1)
        elif s.dtype == "int64":
            t = torch.randint(0, s.high or 1, (batch, *s.shape), generator=g)
            if batch > 1:
                t[-1] = (s.high or 1) - 1
        else:
            t = torch.randn(batch, *s.shape, generator=g)
        out.append(t.to(device))
    return out


def macs_params(model: nn.Module, specs: list[InputSpec]) -> tuple[float, int]:
    """MACs of one sample with the deployed input shapes, and parameters."""
    inputs = random_inputs(specs, 1)
    kwargs = {(first_input(model) if s.name == "sample" else s.name): t for s, t in zip(specs, inputs)}
    return model_macs_params(model, kwargs)
