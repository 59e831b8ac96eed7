"""SDXL pipelines in and out: the conditioning the run caches is the one StableDiffusionXLPipeline
computes, the pruned U-Net goes back into a pipeline that diffusers samples with and without the
package, and the SDXL layouts the run cannot train are refused by name."""

import json
import os
import re

import numpy as np
import pytest
import torch
import yaml
from helpers.cli import assert_refused
from helpers.portable import samples_without_the_package, text_to_image_samples
from helpers.tiny_models import captioned_images

from nni_2ndmatch.config import validate_config

pytest.importorskip("transformers")


def _config(tmp_path, images, **data):
    from nni_2ndmatch.models import write_tiny_sdxl

    teacher = write_tiny_sdxl(tmp_path / "teacher", resolution=8)
    return {"version": 1, "model": {"teacher": {"path": str(teacher)}},
            "data": {"path": str(images), "resolution": 8, "channels": 3, **data},
            "pruning": {"pruner": "taylor", "sparse_ratio": 0.3},
            "finetune": {"finetuner": "2ndmatch", "steps": 2, "batch_size": 4},
            "output_dir": str(tmp_path / "run")}


def _cached_data(config):
    from nni_2ndmatch.job.data import open_data, plan_data
    from nni_2ndmatch.job.inputs import load_teacher
    from nni_2ndmatch.training import Runtime

    teacher, parts = load_teacher(config.model.teacher, 8)
    return open_data(config, plan_data(config, teacher, parts), parts, Runtime(), progress=False).dataset, parts


@pytest.mark.slow
def test_the_cached_conditioning_is_what_the_sdxl_pipeline_computes(tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from PIL import Image

    images = captioned_images(tmp_path / "images")
    Image.fromarray(np.zeros((12, 8, 3), dtype=np.uint8)).save(images / "6.png")  # taller than wide
    data, parts = _cached_data(validate_config(_config(tmp_path, images, caption_dropout=0.5)))
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "teacher")
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt("picture 2", do_classifier_free_guidance=True)
    item = data[5]  # "picture 2", an 8x8 image
    torch.testing.assert_close(item["encoder_hidden_states"], embeds[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(item["text_embeds"], pooled[0], rtol=1e-5, atol=1e-6)
    expected = pipe._get_add_time_ids((8, 8), (0, 0), (8, 8), torch.float32,
                                      text_encoder_projection_dim=parts.text_encoder_2.config.projection_dim)
    torch.testing.assert_close(item["time_ids"], expected[0])
    # the 12x8 original: its size, and the central crop's top row in the image resized to 8 wide (12 x 8 -> 2)
    assert data[6]["time_ids"].tolist() == [12.0, 8.0, 2.0, 0.0, 8.0, 8.0]
    # a dropped caption is the pipeline's unconditional input: zeros (force_zeros_for_empty_prompt)
    assert not negative.any() and not negative_pooled.any()
    kwargs = {k: torch.stack([data[i][k] for i in range(2)]) for k in ("encoder_hidden_states", "text_embeds")}
    dropped = data.drop_captions(kwargs, torch.tensor([True, False]))
    for key, value in dropped.items():
        assert not value[0].any() and torch.equal(value[1], kwargs[key][1])




@pytest.mark.slow
def test_the_tiny_sdxl_example_gives_a_pipeline_diffusers_samples_with_and_without_the_package(tmp_path):

    from nni_2ndmatch import load_pipeline
    from nni_2ndmatch.job.run import run_job

    raw = yaml.safe_load(open(os.path.join(os.path.dirname(__file__), "..", "examples", "tiny_sdxl.yaml")))
    raw["finetune"].update(steps=2, batch_size=4)
    raw["evaluate"].update(samples=4, ddim_steps=3)
    del raw["export"]  # two ONNX exports, most of this test's time: the SDXL U-Net's is tests/test_export.py's
    raw["output_dir"] = str(tmp_path / "run")
    summary = run_job(validate_config(raw), "run", progress=False)
    assert summary["student_params"] < summary["teacher_params"]
    pipe = load_pipeline(tmp_path / "run" / "pipeline")
    assert type(pipe).__name__ == "StableDiffusionXLPipeline" and type(pipe.unet).__module__ == "nni_2ndmatch"
    assert sum(p.numel() for p in pipe.unet.parameters()) == summary["student_params"]
    got = samples_without_the_package(tmp_path / "run" / "pipeline", tmp_path)
    torch.testing.assert_close(got, text_to_image_samples(pipe), atol=1e-5, rtol=0)  # another process: float32 rounding


def _edit(path, **entries):
    data = json.loads(path.read_text())
    for key, value in entries.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("edit, expected", [
    (lambda d: _edit(d / "model_index.json", text_encoder=None, tokenizer=None),
     r"model_index.json: text_encoder_2 without text_encoder is an SDXL refiner, which is not supported"),
    (lambda d: _edit(d / "model_index.json", text_encoder_2=None, tokenizer_2=None),
     r"model_index.json: StableDiffusionXLPipeline has no text_encoder_2; it conditions on both CLIP encoders"),
    (lambda d: _edit(d / "model_index.json", tokenizer_2=None),
     r"model_index.json: a text_encoder_2 needs its tokenizer_2"),
    (lambda d: _edit(d / "model_index.json", _class_name="StableDiffusionXLInpaintPipeline"),
     r"_class_name StableDiffusionXLInpaintPipeline is SDXL inpainting .*not supported yet; supported: .*SDXL "
     r"\(StableDiffusionXLPipeline\)"),
    (lambda d: _edit(d / "unet" / "config.json", addition_embed_type=None),
     r"model.teacher: an SDXL pipeline's U-Net needs addition_embed_type text_time with "
     r"projection_class_embeddings_input_dim 80"),
])
def test_an_sdxl_layout_the_run_cannot_train_is_one_clear_error(edit, expected, tmp_path):
    raw = _config(tmp_path, captioned_images(tmp_path / "images"))
    edit(tmp_path / "teacher")
    assert_refused(raw, tmp_path, expected)


@pytest.mark.parametrize("kind, denoiser", [("StableDiffusionXLPipeline", "unet"),
                                            ("StableDiffusion3Pipeline", "transformer")])
def test_a_whole_sdxl_or_sd3_pipeline_to_onnx_is_refused_naming_what_to_export_instead(kind, denoiser, tmp_path):
    from nni_2ndmatch.deploy import DeployError
    from nni_2ndmatch.deploy.onnx_pipeline import export_onnx_pipeline
    from nni_2ndmatch.models import write_tiny_sd3, write_tiny_sdxl

    folder = (write_tiny_sdxl if denoiser == "unet" else write_tiny_sd3)(tmp_path / "pipe")
    with pytest.raises(DeployError, match=rf"is a {kind}, whose whole-pipeline ONNX .*Export its denoiser alone: "
                                          rf"python export/to_onnx.py --model {re.escape(str(folder / denoiser))} "):
        export_onnx_pipeline(folder, tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()
