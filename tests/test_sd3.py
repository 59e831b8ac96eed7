"""SD3 pipelines in and out, trained by flow matching: the cached conditioning is the one
StableDiffusion3Pipeline computes, pruning its joint transformer removes the same channels from the
image and the text streams, and the pruned transformer goes back into a pipeline that diffusers
samples with and without the package."""

import copy
import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
import yaml
from helpers.cli import assert_refused, cli_here
from helpers.portable import samples_without_the_package, text_to_image_samples
from helpers.tiny_models import captioned_images
from torch import nn

from benchmarks.arms import VARIANT
from nni_2ndmatch.config import validate_config

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parent.parent


def _config(tmp_path, t5=False, **data):
    from nni_2ndmatch.models import write_tiny_sd3

    teacher = write_tiny_sd3(tmp_path / "teacher", resolution=8, t5=t5)
    return {"version": 1, "model": {"teacher": {"path": str(teacher)}},
            "data": {"path": str(captioned_images(tmp_path / "images")), "resolution": 8, "channels": 3, **data},
            "pruning": {"pruner": "L1NormPruner", "sparse_ratio": 0.3},
            "finetune": {"finetuner": "2ndmatch", "steps": 2, "batch_size": 4},
            "output_dir": str(tmp_path / "run")}


@pytest.mark.slow
@pytest.mark.parametrize("t5", [False, True])
def test_the_cached_conditioning_is_what_the_sd3_pipeline_computes(tmp_path, t5):
    from diffusers import StableDiffusion3Pipeline

    from nni_2ndmatch.job.data import open_data, plan_data
    from nni_2ndmatch.job.inputs import load_teacher
    from nni_2ndmatch.training import Runtime

    config = validate_config(_config(tmp_path, t5=t5, caption_dropout=0.5))
    teacher, parts = load_teacher(config.model.teacher, 8)
    data = open_data(config, plan_data(config, teacher, parts), parts, Runtime(), progress=False).dataset
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / "teacher",
                                                    **({} if t5 else {"text_encoder_3": None, "tokenizer_3": None}))
    assert (pipe.text_encoder_3 is not None) == t5 and (parts.text_encoder_3 is not None) == t5
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt("picture 2", None, None,
                                                                   do_classifier_free_guidance=True)
    item = data[5]  # "picture 2"
    assert set(item) == {"sample", "encoder_hidden_states", "pooled_projections"}
    clip = pipe.tokenizer.model_max_length

    def same_tokens(got, want):  # CLIP's tokens, then T5's 256 (encoded in batches of other sizes: float32 sums)
        torch.testing.assert_close(got[:clip], want[:clip], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[clip:], want[clip:], rtol=1e-5, atol=2e-5)
        assert got[clip:].abs().max() > 0.1 if t5 else not got[clip:].any()

    same_tokens(item["encoder_hidden_states"], embeds[0])
    # stored: T5's tokens where there is a T5; without, its 256 zeros are added on reading, not stored
    assert (data.plan.text_shape[0], data.plan.zero_tokens) == ((clip + 256, 0) if t5 else (clip, 256))
    torch.testing.assert_close(item["pooled_projections"], pooled[0], rtol=1e-5, atol=1e-6)
    kwargs = {k: torch.stack([data[i][k] for i in range(2)]) for k in ("encoder_hidden_states", "pooled_projections")}
    dropped = data.drop_captions(kwargs, torch.tensor([True, False]))  # the pipeline's empty negative prompt
    same_tokens(dropped["encoder_hidden_states"][0], negative[0])
    torch.testing.assert_close(dropped["pooled_projections"][0], negative_pooled[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(dropped["pooled_projections"][1], kwargs["pooled_projections"][1])


def _kept_rows(small: nn.Linear, big: nn.Linear, scale: float = 1.0) -> list[int]:
    """Which of ``big``'s outputs ``small`` kept (found by their biases, random, so unique; ``small``'s
    scaled by ``scale``)."""
    rows = [int((big.bias - b / scale).abs().argmin()) for b in small.bias]
    torch.testing.assert_close(small.bias, big.bias[rows] * scale)
    return rows


def test_pruning_the_joint_transformer_equals_masking_the_same_channels_of_both_streams():
    """Independent of how the surgery groups channels: the student must compute what the teacher
    computes with the removed q/k/v and MLP channels zeroed, the heads' logits included (their
    1/sqrt(head_dim) is the dense one's). Image and text queries, keys and values meet in one
    attention, so a stream pruned at other positions than the other would not."""
    from nni_2ndmatch.models import default_example_inputs, write_tiny_sd3
    from nni_2ndmatch.nni import prune_diffusers
    from nni_2ndmatch.pruning import load_model_folder

    teacher = load_model_folder(write_tiny_sd3(Path(os.environ.get("TMPDIR", "/tmp")) / "sd3-prune")
                                / "transformer").eval()
    student, report = prune_diffusers(teacher, "L1NormPruner", 0.3)
    assert report["params_after"] < report["params_before"]
    masked = copy.deepcopy(teacher)
    pruned_out = []
    for name, layer in student.named_modules():
        dense = masked.get_submodule(name)
        if isinstance(layer, nn.Linear) and layer.out_features < dense.out_features:
            pruned_out.append(name)
            keep = torch.zeros(dense.out_features, dtype=torch.bool)
            query = name.rsplit(".", 1)[-1] in ("to_q", "add_q_proj")  # scaled by sqrt(d' / d)
            scale = math.sqrt(layer.out_features / dense.out_features) if query else 1.0
            keep[_kept_rows(layer, teacher.get_submodule(name), scale)] = True
            with torch.no_grad():
                dense.weight[~keep] = 0
                dense.bias[~keep] = 0
    # the attention and MLP widths, and the conditioning embedding's; no residual width
    assert {n.rsplit(".", 1)[-1] for n in pruned_out} == {"to_q", "to_k", "to_v", "add_q_proj", "add_k_proj",
                                                          "add_v_proj", "proj", "linear_1", "linear_2"}
    inputs = default_example_inputs(teacher, 3)
    with torch.no_grad():
        torch.testing.assert_close(student(**inputs).sample, masked(**inputs).sample, rtol=1e-4, atol=1e-5)




@pytest.mark.slow
def test_the_tiny_sd3_example_gives_a_pipeline_diffusers_samples_with_and_without_the_package(tmp_path):

    from nni_2ndmatch import load_pipeline
    from nni_2ndmatch.job.run import run_job
    from nni_2ndmatch.models import pipeline_denoiser

    raw = yaml.safe_load((ROOT / "examples" / "tiny_sd3.yaml").read_text())
    raw["finetune"].update(VARIANT, finetuner="2ndmatch", steps=2, batch_size=4)  # the term through it (kd there)
    raw["evaluate"].update(samples=4, ddim_steps=3)
    raw["export"].update(repeats=3)
    raw["output_dir"] = str(tmp_path / "run")
    summary = run_job(validate_config(raw), "run", progress=False)
    assert summary["schedule"] == {"flow_matching": "FlowMatchEulerDiscreteScheduler", "shift": 3.0,
                                   "prediction_type": "flow"}
    assert summary["student_params"] < summary["teacher_params"] and math.isfinite(summary["final"]["jac"])
    exported = json.loads((tmp_path / "run" / "onnx" / "student.onnx.json").read_text())
    assert exported["parity"]["passed"] and [i["name"] for i in exported["inputs"]] == \
        ["sample", "timestep", "encoder_hidden_states", "pooled_projections"]
    text = next(i for i in exported["inputs"] if i["name"] == "encoder_hidden_states")
    results = json.loads((tmp_path / "run" / "report" / "results.json").read_text())
    assert results["quality"]["fidelity"] > 0 and results["quality"]["sampler"] == "flow-matching Euler"
    card = (tmp_path / "run" / "pipeline" / "README.md").read_text()
    assert "3 flow-matching Euler steps" in card and "DDIM" not in card
    assert re.search(r'from_pretrained\("pipeline", trust_remote_code=True, .*text_encoder_3=None, tokenizer_3=None\)',
                     card)  # diffusers refuses the folder without them
    pipe = load_pipeline(tmp_path / "run" / "pipeline")
    assert type(pipe).__name__ == "StableDiffusion3Pipeline" and type(pipe.transformer).__module__ == "nni_2ndmatch"
    assert pipeline_denoiser(tmp_path / "run" / "pipeline") == "transformer"  # the output is an input too
    tokens = pipe.tokenizer.model_max_length + 256  # the exported transformer takes CLIP's tokens, then T5's 256
    assert text["shape"] == ["batch", tokens, pipe.transformer.config.joint_attention_dim]
    got = samples_without_the_package(tmp_path / "run" / "pipeline", tmp_path, text_encoder_3="None",
                                      tokenizer_3="None")
    torch.testing.assert_close(got, text_to_image_samples(pipe), atol=1e-5, rtol=0)  # another process: float32 rounding


def _edit(path, **entries):
    path.write_text(json.dumps({**json.loads(path.read_text()), **entries}))


@pytest.mark.parametrize("edit, expected", [
    (lambda d: _edit(d / "scheduler" / "scheduler_config.json", _class_name="EulerDiscreteScheduler",
                     beta_schedule="scaled_linear"),
     r"model_index.json: the scheduler \(EulerDiscreteScheduler\) does not match the objective "
     r"SD3Transformer2DModel was trained with; allowed: a flow-matching scheduler"),
    (lambda d: _edit(d / "model_index.json", text_encoder=["transformers", "CLIPTextModel"]),
     r"model_index.json: text_encoder is CLIPTextModel; allowed: CLIPTextModelWithProjection"),
    (lambda d: _edit(d / "scheduler" / "scheduler_config.json", use_dynamic_shifting=True),
     r"scheduler_config.json: use_dynamic_shifting=true .* is not supported; allowed: a fixed shift"),
    (lambda d: _edit(d / "model_index.json", text_encoder_2=[None, None], tokenizer_2=[None, None]),
     r"model_index.json: StableDiffusion3Pipeline has no text_encoder_2; it conditions on both CLIP encoders"),
    (lambda d: _edit(d / "model_index.json", _class_name="StableDiffusion3Img2ImgPipeline"),
     r"_class_name StableDiffusion3Img2ImgPipeline is an SD3 variant other than StableDiffusion3Pipeline"),
])
def test_an_sd3_layout_or_schedule_the_run_cannot_train_is_one_clear_error(edit, expected, tmp_path):
    raw = _config(tmp_path)
    edit(tmp_path / "teacher")
    assert_refused(raw, tmp_path, expected)


def test_a_gradient_pruner_is_refused_for_a_flow_matching_pipeline(tmp_path):
    raw = _config(tmp_path)
    raw["pruning"]["pruner"] = "taylor"
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    r = cli_here("run", tmp_path / "cfg.yaml")
    assert r.returncode == 2 and "pruning.pruner: value 'taylor' is not allowed" in r.stderr, r.stderr
    assert "the pipeline predicts flow" in r.stderr


def test_sd35s_per_head_query_key_norms_are_refused_by_the_pruning():
    """SD3.5 normalises queries and keys per head with one weight shared by every head; pruning
    channels within heads would give heads the wrong gains, so it is an error naming the layer."""
    from diffusers import SD3Transformer2DModel

    from nni_2ndmatch.models import default_example_inputs
    from nni_2ndmatch.nni import prune_diffusers

    model = SD3Transformer2DModel(sample_size=4, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                  pooled_projection_dim=8, out_channels=4, qk_norm="rms_norm")
    with pytest.raises(ValueError, match=r"attention transformer_blocks.0.attn normalises queries and keys per "
                                         r"head \(qk_norm, as SD3.5 and Flux do; 1 such layers\).*allowed: attention "
                                         "without qk_norm"):
        prune_diffusers(model, "L1NormPruner", 0.3, example_inputs=default_example_inputs(model, 2))
