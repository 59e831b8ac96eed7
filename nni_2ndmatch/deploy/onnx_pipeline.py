"""A whole Stable Diffusion pipeline as ONNX, in the folder layout that diffusers'
``OnnxStableDiffusionPipeline`` (and ONNX Runtime pipelines elsewhere) load:
``text_encoder/``, ``unet/``, ``vae_encoder/``, ``vae_decoder/`` (each a ``model.onnx`` checked
against PyTorch in onnxruntime before it is written), the tokenizer, the scheduler and
``model_index.json``.

The ONNX pipeline scales latents by SD 1.x's fixed 0.18215; a VAE with another ``scaling_factor``
gets the ratio folded into its decoder and encoder, so the images are those of the torch pipeline.
The encoder returns the posterior's mean (deterministic), not a sample.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..files import atomic_dir, atomic_write_json, check_replaceable, read_json_object
from .errors import DeployError, ExportError, ParityError
from .onnx_export import TOLERANCE, check_options, errors_against, export_onnx, ort_session, quiet_exporter, versions

#: the latent scale OnnxStableDiffusionPipeline applies, whatever the VAE says
ONNX_PIPELINE_SCALE = 0.18215


class _TextEncoder(nn.Module):
    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.encoder(input_ids=input_ids.long(), return_dict=False)[0]


class _VaeDecoder(nn.Module):
    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae, self.ratio = vae, ONNX_PIPELINE_SCALE / vae.config.scaling_factor

    def forward(self, latent_sample: Tensor) -> Tensor:
        return self.vae.decode(latent_sample * self.ratio, return_dict=False)[0]


class _VaeEncoder(nn.Module):
    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae, self.ratio = vae, vae.config.scaling_factor / ONNX_PIPELINE_SCALE

    def forward(self, sample: Tensor) -> Tensor:
        return self.vae.encode(sample, return_dict=False)[0].mean * self.ratio


def _export_part(wrapper: nn.Module, inputs: dict[str, Tensor], checks: list[dict[str, Tensor]], out: Path,
                 opset: int, tolerance: float) -> dict[str, Any]:
    """``wrapper`` as ``out`` (inputs by name, one dynamic batch axis), its output checked against
    PyTorch in onnxruntime on ``checks`` before the file is written."""
    import onnx

    names = list(inputs)
    axes = {n: {0: "batch"} for n in [*names, "out"]}
    try:
        with quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(wrapper, tuple(inputs.values()), input_names=names, output_names=["out"],
                                        opset_version=opset, dynamo=True, dynamic_axes=axes, verbose=False)
    except Exception as e:  # the exporter raises many types; all mean the same to the user
        raise ExportError(f"the ONNX exporter failed on {type(wrapper).__name__.strip('_')}: {type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from e
    proto = program.model_proto
    onnx.checker.check_model(proto)
    session = ort_session(proto.SerializeToString())
    errors = []
    for check in checks:
        with torch.no_grad():
            want = wrapper(*check.values()).double().numpy()
        got = session.run(None, {k: v.numpy() for k, v in check.items()})[0]
        errors.append(errors_against(got, want))
    worst = max(e["max_rel_error"] for e in errors)
    if worst > tolerance:
        raise ParityError(f"ONNX export of {out.parent.name} does not match PyTorch: max relative error {worst:.3g} "
                          f"> tolerance {tolerance:.3g}; nothing was written")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(proto.SerializeToString())
    return {"file": f"{out.parent.name}/{out.name}", "inputs": names, "nodes": len(proto.graph.node),
            "parity": {"batches": [len(next(iter(c.values()))) for c in checks], "max_rel_error": worst,
                       "tolerance": tolerance, "passed": True}}


def export_onnx_pipeline(pipeline: str | os.PathLike, out: str | os.PathLike, *, opset: int = 20,
                         fp16: bool = False, seed: int = 0) -> dict[str, Any]:
    """Write ``out``: the text-to-image pipeline folder ``pipeline`` (a Stable Diffusion 1.x/2.x
    pipeline, its denoiser pruned or dense) as ONNX for ``OnnxStableDiffusionPipeline``. ``fp16``:
    the U-Net in float16 (float32 inputs and output); the text encoder and VAE stay float32.
    Written atomically; returns the report also written to ``out/export.json``."""
    from ..models import pipeline_denoiser
    from ..pruning import load_pipeline

    pipeline, out = Path(pipeline), Path(out)
    check_options(opset, "dynamo", None, exporter_fixed=True)
    check_replaceable(out, "export.json")  # before any work: an earlier export of it, or nothing of the user's
    if not (pipeline / "model_index.json").is_file():
        raise DeployError(f"--pipeline {str(pipeline)!r} is not a pipeline folder (no model_index.json)")
    try:
        pipe = load_pipeline(pipeline)
    except (OSError, ValueError) as e:
        raise DeployError(f"cannot load the pipeline {str(pipeline)!r}: {e}") from None
    denoiser = pipeline_denoiser(pipeline)
    if denoiser != "unet" or getattr(pipe, "text_encoder_2", None) is not None:
        raise DeployError(f"{str(pipeline)!r} is a {type(pipe).__name__}, whose whole-pipeline ONNX layout (diffusers' "
                          "OnnxStableDiffusionPipeline) does not exist; allowed: a Stable Diffusion 1.x/2.x pipeline. "
                          f"Export its denoiser alone: python export/to_onnx.py --model {pipeline / denoiser} "
                          f"--out {denoiser}.onnx")
    needed = ("text_encoder", "tokenizer", "unet", "vae", "scheduler")
    missing = [k for k in needed if getattr(pipe, k, None) is None]
    if missing:
        raise DeployError(f"{str(pipeline)!r} is not a text-to-image pipeline of the Stable Diffusion layout: it has "
                          f"no {', '.join(missing)}; allowed: a pipeline with {', '.join(needed)}")
    g = torch.Generator().manual_seed(seed)
    seq, size = pipe.tokenizer.model_max_length, pipe.unet.config.sample_size
    image = size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    vocab = pipe.text_encoder.config.vocab_size
    channels = pipe.unet.config.in_channels

    def ids(batch: int) -> dict[str, Tensor]:
        return {"input_ids": torch.randint(0, vocab, (batch, seq), generator=g, dtype=torch.int32)}

    def latents(batch: int) -> dict[str, Tensor]:
        return {"latent_sample": torch.randn(batch, channels, size, size, generator=g)}

    def images(batch: int) -> dict[str, Tensor]:
        return {"sample": torch.rand(batch, pipe.vae.config.in_channels, image, image, generator=g) * 2 - 1}

    report: dict[str, Any] = {"format_version": 1, "source": pipeline.name, "opset": opset,
                              "precision": {"unet": "fp16" if fp16 else "fp32", "others": "fp32"},
                              "latent_scale": {"vae": pipe.vae.config.scaling_factor, "onnx_pipeline":
                                               ONNX_PIPELINE_SCALE}, "parts": {}, "versions": versions()}
    with atomic_dir(out, marker="export.json") as tmp:
        parts = {"text_encoder": (_TextEncoder(pipe.text_encoder.eval()), ids),
                 "vae_encoder": (_VaeEncoder(pipe.vae.eval()), images),
                 "vae_decoder": (_VaeDecoder(pipe.vae.eval()), latents)}
        for name, (wrapper, make) in parts.items():
            report["parts"][name] = _export_part(wrapper, make(2), [make(1), make(3)], tmp / name / "model.onnx",
                                                 opset, TOLERANCE["fp32"])
        with tempfile.TemporaryDirectory() as work:
            unet = export_onnx(pipe.unet.eval(), Path(work) / "model.onnx", opset=opset, fp16=fp16, seq_len=seq,
                               source={"class": type(pipe.unet).__name__})
            (tmp / "unet").mkdir()
            for name in ("model.onnx", unet["external_data"]):  # a U-Net over 2 GB keeps its weights beside
                if name is not None:
                    shutil.copy2(Path(work) / name, tmp / "unet" / name)
        report["parts"]["unet"] = {"file": "unet/model.onnx", "inputs": [i["name"] for i in unet["inputs"]],
                                   "nodes": unet["nodes"], "parity": unet["parity"]}
        # the source's own tokenizer files: re-saved, transformers 5 would keep tokenizer.json alone, which
        # transformers 4's CLIPTokenizer cannot read (it needs vocab.json and merges.txt)
        shutil.copytree(pipeline / "tokenizer", tmp / "tokenizer", ignore=shutil.ignore_patterns(".*"))
        pipe.scheduler.save_pretrained(tmp / "scheduler")
        import diffusers

        onnx_model = ["diffusers", "OnnxRuntimeModel"]
        atomic_write_json(tmp / "model_index.json", {
            "_class_name": "OnnxStableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
            "feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
            "scheduler": ["diffusers", type(pipe.scheduler).__name__],
            "text_encoder": onnx_model, "tokenizer": read_json_object(pipeline / "model_index.json")["tokenizer"],
            "unet": onnx_model, "vae_decoder": onnx_model, "vae_encoder": onnx_model})
        atomic_write_json(tmp / "export.json", report)
    return report

