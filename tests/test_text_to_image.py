"""Latent, text-conditional pipelines: pipeline in, pipeline out, on tiny pipelines built here."""

import copy
import json
import re

import numpy as np
import pytest
import torch
import yaml
from helpers.cli import cli_here
from helpers.tiny_models import captioned_images, tiny_clip, tiny_dit_pipeline, tiny_feature_onnx, tiny_sd_pipeline

from nni_2ndmatch.config import validate_config
from nni_2ndmatch.training import Watch

pytest.importorskip("transformers")


def _config(tmp_path, prediction_type="epsilon", **finetune):
    teacher = tiny_sd_pipeline(tmp_path / "teacher", prediction_type)
    images = captioned_images(tmp_path / "images")
    return {"version": 1, "model": {"teacher": {"path": str(teacher)}},
            "data": {"path": str(images), "resolution": 8, "channels": 3},
            "pruning": {"pruner": "magnitude", "sparse_ratio": 0.3, "round_to": None},
            "finetune": {"finetuner": "2ndmatch", "steps": 2, "batch_size": 4, **finetune},
            "output_dir": str(tmp_path / "run")}


def _data(config, teacher, parts):
    """The run's training data as run_job opens it (one process): the encoded cache in output_dir/cache."""
    from nni_2ndmatch.job.data import open_data, plan_data
    from nni_2ndmatch.training import Runtime

    return open_data(config, plan_data(config, teacher, parts), parts, Runtime(), progress=False)


def _shard_times(run):
    return {p.name: p.stat().st_mtime_ns for p in (run / "cache").glob("*.safetensors")}


@pytest.mark.slow
def test_latents_and_caption_embeddings_are_the_encoders_outputs_and_are_cached(tmp_path):
    from diffusers import AutoencoderKL
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    from nni_2ndmatch.job.inputs import load_teacher

    config = validate_config(_config(tmp_path))
    teacher, parts = load_teacher(config.model.teacher, 8)
    data = _data(config, teacher, parts).dataset
    assert len(data) == 8 and _shard_times(tmp_path / "run")
    # item 5 by hand: the file, the VAE's posterior mean times its scaling factor, the caption's last hidden state
    source = tmp_path / "teacher" / "pipeline"
    vae = AutoencoderKL.from_pretrained(source / "vae")
    pixels = torch.from_numpy(np.asarray(Image.open(tmp_path / "images" / "5.png"), dtype=np.float32))
    with torch.no_grad():
        latent = vae.encode(pixels.permute(2, 0, 1)[None] / 127.5 - 1).latent_dist.mean[0] * vae.config.scaling_factor
        tokenizer = CLIPTokenizer.from_pretrained(source / "tokenizer")
        ids = tokenizer(["picture 2"], padding="max_length", max_length=24, return_tensors="pt").input_ids
        embedding = CLIPTextModel.from_pretrained(source / "text_encoder")(ids).last_hidden_state[0]
    item = data[5]
    torch.testing.assert_close(item["sample"], latent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(item["encoder_hidden_states"], embedding, rtol=1e-5, atol=1e-5)

    written = _shard_times(tmp_path / "run")
    again = _data(config, teacher, parts).dataset
    assert _shard_times(tmp_path / "run") == written and torch.equal(again[5]["sample"], item["sample"])  # reused
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "images" / "5.png")  # the data changed
    changed = _data(config, teacher, parts).dataset
    assert not torch.equal(changed[5]["sample"], item["sample"])
    assert torch.equal(changed[4]["sample"], data[4]["sample"])


@pytest.mark.slow
def test_caption_dropout_swaps_in_the_empty_prompt_and_the_loop_uses_it(tmp_path):
    from nni_2ndmatch.job.inputs import load_teacher

    raw = _config(tmp_path)
    raw["data"]["caption_dropout"] = 0.5
    config = validate_config(raw)
    teacher, parts = load_teacher(config.model.teacher, 8)
    data = _data(config, teacher, parts).dataset
    ids = parts.tokenizer([""], padding="max_length", max_length=24, return_tensors="pt").input_ids
    with torch.no_grad():
        empty = parts.text_encoder(ids).last_hidden_state[0]
    kwargs = {"encoder_hidden_states": torch.stack([data[i]["encoder_hidden_states"] for i in range(4)])}
    drop = torch.tensor([True, False, False, True])
    dropped = data.drop_captions(kwargs, drop)["encoder_hidden_states"]
    torch.testing.assert_close(dropped[0], empty, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dropped[3], empty, rtol=1e-5, atol=1e-5)
    assert torch.equal(dropped[1:3], kwargs["encoder_hidden_states"][1:3])

    seen = []
    original = type(data).drop_captions
    type(data).drop_captions = lambda self, kw, d: seen.append(d.clone()) or original(self, kw, d)
    try:
        from nni_2ndmatch import TrainConfig, finetune, get_finetuner

        student = copy.deepcopy(teacher).requires_grad_(True)
        finetune(student, teacher, get_finetuner("dsm"), data, TrainConfig(steps=3, batch_size=4), tmp_path / "ft",
                 watch=Watch(progress=False))
    finally:
        type(data).drop_captions = original
    assert len(seen) == 3 and 0 < torch.stack(seen).float().mean() < 1


def test_v_prediction_trains_against_the_velocity():
    """DSM's target under v_prediction: sqrt(abar_t) eps - sqrt(1 - abar_t) x0, with abar_t from
    SD's scaled-linear betas computed here in float64."""
    from diffusers import DDPMScheduler

    from nni_2ndmatch import get_finetuner

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type="v_prediction")
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    abar = np.cumprod(1 - betas)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([0, 500, 999])
    out = torch.randn(3, 2, 4, 4, generator=g)
    _, terms = get_finetuner("dsm", scheduler=scheduler).loss(lambda x, ts: out, None, x0, noise, t)
    a = torch.from_numpy(abar[t.numpy()]).view(-1, 1, 1, 1)
    velocity = a.sqrt() * noise.double() - (1 - a).sqrt() * x0.double()
    expected = (out.double() - velocity).pow(2).flatten(1).sum(1).mean()
    assert terms["dsm"] == pytest.approx(float(expected), rel=1e-5)
    _, eps_terms = get_finetuner("dsm").loss(lambda x, ts: out, None, x0, noise, t)
    assert eps_terms["dsm"] == pytest.approx(float((out - noise).pow(2).flatten(1).sum(1).mean()), rel=1e-6)


@pytest.mark.slow
def test_a_v_prediction_pipeline_trains_on_its_own_schedule_and_records_it(tmp_path):
    """The same pipeline but for its prediction type, one step each: the summary records the
    schedule, and the trained students differ (the targets are velocities, not noise)."""
    from nni_2ndmatch import load_pruned
    from nni_2ndmatch.job.run import run_job

    students = {}
    for prediction in ("epsilon", "v_prediction"):
        raw = _config(tmp_path / prediction, prediction, finetuner="dsm", steps=1)
        summary = run_job(validate_config(raw), "run", progress=False)
        assert summary["schedule"] == {"beta_schedule": "scaled_linear", "prediction_type": prediction}
        students[prediction] = load_pruned(tmp_path / prediction / "run" / "student").state_dict()
        assert json.loads((tmp_path / prediction / "run" / "pipeline" / "scheduler" / "scheduler_config.json")
                          .read_text())["prediction_type"] == prediction
    pruned = load_pruned(tmp_path / "epsilon" / "run" / "pruned").state_dict()
    other = load_pruned(tmp_path / "v_prediction" / "run" / "pruned").state_dict()
    assert all(torch.equal(pruned[k], other[k]) for k in pruned)  # the same start
    assert any(not torch.equal(students["epsilon"][k], students["v_prediction"][k]) for k in pruned)


@pytest.mark.slow
def test_a_stable_diffusion_pipeline_in_gives_its_pipeline_out_evaluated_with_fid_and_clip_score(tmp_path):
    """The run writes the teacher's pipeline with the student in it, which diffusers loads and
    samples; teacher, starting student, a kd baseline and the student sample through the teacher's
    pipeline with the same prompts and seeds, scored with FID and CLIP score from local networks."""
    pytest.importorskip("torchmetrics")
    from nni_2ndmatch import load_pipeline, load_pruned
    from nni_2ndmatch.job.run import run_job

    raw = _config(tmp_path)
    tiny_feature_onnx(tmp_path / "features.onnx")
    raw["evaluate"] = {"samples": 4, "ddim_steps": 2, "guidance_scale": 2.0, "compare": ["kd"],
                       "fid_features": str(tmp_path / "features.onnx"), "clip_model": str(tiny_clip(tmp_path / "c"))}
    summary = run_job(validate_config(raw), "run", progress=False)
    teacher, out = tmp_path / "teacher" / "pipeline", tmp_path / "run" / summary["pipeline_dir"]
    assert summary["schedule"] == {"beta_schedule": "scaled_linear", "prediction_type": "epsilon"}
    assert json.loads((out / "model_index.json").read_text())["unet"] == ["nni_2ndmatch", "PrunedUNet2DConditionModel"]
    for part in ("vae", "text_encoder", "tokenizer", "scheduler"):  # the frozen parts are the teacher's, unchanged
        for file in (teacher / part).iterdir():
            assert (out / part / file.name).read_bytes() == file.read_bytes()
    pipe = load_pipeline(out)
    student = load_pruned(tmp_path / "run" / "student")
    x, t, emb = torch.randn(2, 2, 4, 4), torch.tensor([3, 900]), torch.randn(2, 5, 8)
    assert torch.equal(pipe.unet(x, t, encoder_hidden_states=emb).sample, student(x, t, emb).sample)
    images = pipe("picture 1", num_inference_steps=2, height=8, width=8, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 8, 8, 3) and np.isfinite(images).all()

    results = json.loads((tmp_path / "run" / "report" / "results.json").read_text())
    quality, rows = results["quality"], results["comparison"]["rows"]
    assert [r["role"] for r in rows] == ["teacher", "start", "baseline", "run"]
    for row in rows:
        assert row["fid"] > 0 and 0 <= row["clip_score"] <= 100 and row["digits_fid"] is None
    assert rows[0]["fidelity"] == 0 and rows[-1]["fidelity"] > 0  # the teacher against itself; the student differs
    assert quality["fid_student"] == rows[-1]["fid"] and quality["clip_score_teacher"] == rows[0]["clip_score"]
    report = (tmp_path / "run" / "report" / "report.md").read_text()
    assert "| model | FID | CLIP score | fidelity" in report and summary["report"].endswith("report.md")


def _edit(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("edit, expected", [
    (lambda d: (d / "images" / "metadata.jsonl").unlink(), r"data: data path '.*images' has no metadata.jsonl"),
    (lambda d: (d / "images" / "7.png").rename(d / "images" / "x.png"),
     r"data: .*metadata.jsonl line 8: file_name '7.png' names no image in"),
    (lambda d: ((d / "images" / "notes.txt").write_text("x"), (d / "images" / "metadata.jsonl").open("a").write(
        '{"file_name": "notes.txt", "text": "a"}\n')), r"line 9: file_name 'notes.txt' names no image in .*suffix"),
    (lambda d: (d / "images" / "metadata.jsonl").write_text('{"file_name": "0.png", "text": "a"}\n'),
     r"data: .*metadata.jsonl: 7 image\(s\) have no entry: 1.png"),
    (lambda d: (d / "images" / "metadata.jsonl").write_text('{"file_name": "0.png"}\n'),
     r"data: .*metadata.jsonl line 1: \"text\" is None; each image needs a caption"),
    (lambda d: _edit(d / "teacher" / "pipeline" / "model_index.json",
                     text_encoder_3=["transformers", "T5EncoderModel"]),
     r"model.teacher: .*model_index.json: text_encoder_3 without text_encoder_2 is not a layout the run knows"),
    (lambda d: _edit(d / "teacher" / "pipeline" / "model_index.json", text_encoder_2=["transformers", "CLIPTextModel"]),
     r"model.teacher: .*model_index.json: text_encoder_2 is CLIPTextModel; allowed: CLIPTextModelWithProjection"),
    (lambda d: _edit(d / "teacher" / "pipeline" / "scheduler" / "scheduler_config.json", prediction_type="sample"),
     r"model.teacher: .*scheduler_config.json: prediction_type='sample' is not supported; allowed: epsilon, "),
])
def test_a_pipeline_or_data_the_run_cannot_use_is_one_clear_error(edit, expected, tmp_path):
    raw = _config(tmp_path)
    edit(tmp_path)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    r = cli_here("run", tmp_path / "cfg.yaml")
    assert r.returncode == 2 and re.search(expected, r.stderr), r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "run").exists()


def test_a_resolution_the_vae_cannot_halve_is_refused_and_the_default_one_is_warned_of(tmp_path, caplog):
    """The tiny SD VAE downsamples 2x: 9 pixels make no whole latent. Left at its default (16), the
    resolution differs from what the pipeline was made for: a warning says so."""
    from nni_2ndmatch.job.data import plan_data
    from nni_2ndmatch.job.inputs import load_teacher

    raw = _config(tmp_path)
    raw["data"]["resolution"] = 9
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    r = cli_here("run", tmp_path / "cfg.yaml")
    assert r.returncode == 2 and "Traceback" not in r.stderr and not (tmp_path / "run").exists()
    assert re.search(r"data.resolution: value 9 is not allowed: the pipeline's VAE downsamples 2x.*allowed: e.g. 8 "
                     r"or 10", r.stderr), r.stderr
    del raw["data"]["resolution"]
    _edit(tmp_path / "teacher" / "pipeline" / "unet" / "config.json", sample_size=16)  # made for 32x32 images
    config = validate_config(raw)
    teacher, parts = load_teacher(config.model.teacher, config.data.resolution)
    with caplog.at_level("WARNING", logger="nni_2ndmatch"):
        plan_data(config, teacher, parts)
    assert "data.resolution is 16, its default, but the teacher was made for 32x32 images" in caplog.text



@pytest.mark.parametrize("class_name, family", [
    ("StableDiffusionXLImg2ImgPipeline", "an SDXL refiner"), ("StableDiffusionXLControlNetPipeline", "an SDXL variant"),
    ("StableDiffusion3InpaintPipeline", "an SD3 variant"), ("FluxPipeline", "Flux"), ("UnCLIPPipeline", "unCLIP"),
    ("StableCascadeCombinedPipeline", "Stable Cascade"), ("StableVideoDiffusionPipeline", "video"),
])
def test_a_pipeline_family_not_supported_yet_is_refused_by_name_listing_those_that_are(class_name, family, tmp_path):
    from nni_2ndmatch.models import pipeline_denoiser

    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": class_name,
                                                           "unet": ["diffusers", "UNet2DConditionModel"]}))
    with pytest.raises(ValueError, match=rf"model_index.json: _class_name {class_name} is {family}.*not supported "
                                         r"yet; supported: Stable Diffusion 1.x/2.x .*DiT .*DDPM"):
        pipeline_denoiser(tmp_path)


@pytest.mark.parametrize("class_name", ["MyPipeline", "['pipeline', 'MyPipeline']"])
def test_a_custom_pipeline_class_is_refused_by_name(class_name, tmp_path):
    """Its pipeline.py would be neither run nor copied into the run's pipeline/, which then would
    not load."""
    from nni_2ndmatch.models import pipeline_denoiser

    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": class_name,
                                                           "unet": ["diffusers", "UNet2DConditionModel"]}))
    with pytest.raises(ValueError, match=rf"_class_name {re.escape(class_name)} is not a diffusers pipeline class"):
        pipeline_denoiser(tmp_path)


@pytest.mark.parametrize("section, key, value, expected", [
    ("finetune", "hflip", True, r"finetune.hflip: value True is not allowed with a latent pipeline"),
])
def test_options_a_latent_pipeline_cannot_honour_are_refused(section, key, value, expected, tmp_path):
    raw = _config(tmp_path)
    raw.setdefault(section, {})[key] = value
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    r = cli_here("run", tmp_path / "cfg.yaml")
    assert r.returncode == 2 and re.search(expected, r.stderr), r.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("evaluate, expected", [
    ({"clip_model": "."}, r"evaluate.clip_model: value '.' is not allowed: it needs prompts"),
    ({"guidance_scale": 3.0}, r"evaluate.guidance_scale: value 3.0 is not allowed: it needs a text-to-image "
                              r"pipeline, or a DiT pipeline of 1000 classes"),
    ({"fid_features": "missing.onnx"}, r"evaluate.fid_features: value 'missing.onnx' is not allowed: no such file; "
                                       r"export the FID Inception network"),
    ({"fid_features": "not-onnx"}, r"evaluate.fid_features: .*not-onnx"),
])
def test_evaluate_options_that_need_what_the_run_lacks_are_refused(evaluate, expected, tmp_path):
    if evaluate.get("fid_features") == "not-onnx":
        (tmp_path / "not-onnx").write_text("text")
        evaluate = {"fid_features": str(tmp_path / "not-onnx")}
    raw = {"version": 1, "model": {"teacher": {"builtin": "tiny-unet"}}, "data": {"builtin": "digits"},
           "pruning": {"pruner": "magnitude"}, "evaluate": evaluate, "output_dir": str(tmp_path / "run")}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    r = cli_here("run", tmp_path / "cfg.yaml")
    assert r.returncode == 2 and re.search(expected, r.stderr), r.stderr
    assert not (tmp_path / "run").exists()


def test_caption_dropout_without_a_text_encoder_is_refused(tmp_path):
    raw = {"version": 1, "model": {"teacher": {"builtin": "tiny-unet"}}, "data": {"builtin": "digits",
           "caption_dropout": 0.1}, "pruning": {"pruner": "magnitude"}, "output_dir": str(tmp_path / "run")}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    r = cli_here("run", tmp_path / "cfg.yaml")
    assert r.returncode == 2 and "data.caption_dropout: value 0.1 is not allowed" in r.stderr, r.stderr


def test_without_transformers_a_text_pipeline_is_a_clear_error_naming_the_extra(tmp_path, monkeypatch):
    import sys

    from nni_2ndmatch.models import load_pipeline_parts

    folder = tiny_sd_pipeline(tmp_path / "sd")
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    with pytest.raises(ValueError, match=r"text_encoder needs the transformers package: pip install "
                                         r"'nni-2ndmatch\[text\]'"):
        load_pipeline_parts(folder)


def _dit_config(tmp_path, **data):
    teacher = tiny_dit_pipeline(tmp_path / "dit")
    return {"version": 1, "model": {"teacher": {"path": str(teacher)}},
            "data": {"path": str(captioned_images(tmp_path / "images")), "resolution": 8, "channels": 3, **data},
            "pruning": {"pruner": "magnitude", "sparse_ratio": 0.3, "round_to": None},
            "finetune": {"finetuner": "2ndmatch", "steps": 2, "batch_size": 4}, "output_dir": str(tmp_path / "run")}


@pytest.mark.slow
def test_a_latent_class_conditional_dit_pipeline_in_gives_its_pipeline_out_and_is_evaluated(tmp_path):
    pytest.importorskip("torchmetrics")
    from nni_2ndmatch import load_pipeline
    from nni_2ndmatch.job.inputs import load_teacher
    from nni_2ndmatch.job.run import run_job

    raw = _dit_config(tmp_path)
    config = validate_config(raw)
    teacher, parts = load_teacher(config.model.teacher, 8)
    data = _data(config, teacher, parts).dataset
    assert data[4]["class_labels"] == 1 and data[4]["sample"].shape == (2, 4, 4)  # metadata.jsonl's "label"
    tiny_feature_onnx(tmp_path / "features.onnx")
    raw["evaluate"] = {"samples": 4, "ddim_steps": 2, "fid_features": str(tmp_path / "features.onnx")}
    summary = run_job(validate_config(raw), "run", progress=False)
    out = tmp_path / "run" / summary["pipeline_dir"]
    assert json.loads((out / "model_index.json").read_text())["transformer"] == \
        ["nni_2ndmatch", "PrunedDiTTransformer2DModel"]
    pipe = load_pipeline(out)
    images = pipe(class_labels=[3], num_inference_steps=2, output_type="np", guidance_scale=1.0,
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 8, 8, 3) and np.isfinite(images).all()
    quality = json.loads((tmp_path / "run" / "report" / "results.json").read_text())["quality"]
    assert quality["fid_student"] > 0 and quality["fidelity"] > 0


@pytest.mark.parametrize("metadata, expected", [
    ('{"file_name": "0.png", "text": "a"}', r'line 1: "label" is None; each image needs a class label'),
    ('{"file_name": "0.png", "label": -1}', r'line 1: "label" is -1; each image needs a class label'),
    ("".join(f'{{"file_name": "{i}.png", "label": {10 + i}}}\n' for i in range(8)),
     r"data: class label 17 is out of range: the teacher has 10 classes"),
    (None, r"evaluate.guidance_scale: value 2.0 is not allowed: .*DiT pipeline of 1000 classes"),
])
def test_class_labels_a_dit_pipeline_cannot_use_are_clear_errors(metadata, expected, tmp_path):
    raw = _dit_config(tmp_path)
    if metadata is None:
        raw["evaluate"] = {"guidance_scale": 2.0}
    else:
        (tmp_path / "images" / "metadata.jsonl").write_text(metadata)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    r = cli_here("run", tmp_path / "cfg.yaml")
    assert r.returncode == 2 and re.search(expected, r.stderr), r.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_resume_after_the_data_changed_is_refused(tmp_path):
    from PIL import Image

    from nni_2ndmatch.job.run import run_job

    raw = _config(tmp_path, finetuner="kd")
    run_job(validate_config(raw), "run", progress=False)
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "images" / "5.png")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({**raw, "finetune": {**raw["finetune"], "steps": 3}}))
    r = cli_here("run", tmp_path / "cfg.yaml", "--resume")
    assert r.returncode == 2 and "--resume: the data or the pipeline's encoders changed" in r.stderr, r.stderr


def test_gradient_pruners_are_refused_for_a_v_prediction_pipeline(tmp_path):
    raw = _config(tmp_path, "v_prediction")
    raw["pruning"]["pruner"] = "taylor"
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    r = cli_here("run", tmp_path / "cfg.yaml")
    assert r.returncode == 2 and "pruning.pruner: value 'taylor' is not allowed" in r.stderr, r.stderr



@pytest.mark.slow
@pytest.mark.parametrize("pruner", ["taylor", "TaylorPruner"])
def test_gradient_pruners_noise_a_pipelines_data_by_its_own_schedule(pruner, tmp_path, monkeypatch):
    """The tiny SD pipeline trains on scaled_linear betas (SD's and SDXL's), not the reference
    linear ones: the pruning's calibration batches are noised by the pipeline's schedule."""
    from nni_2ndmatch.job.run import run_job
    from nni_2ndmatch.nni import distiller, pruners

    seen = []
    if pruner == "TaylorPruner":
        batches = distiller.NoisyBatches.__call__

        def spy(self, items):
            seen.append(self.scheduler.config)
            return batches(self, items)
        monkeypatch.setattr(distiller.NoisyBatches, "__call__", spy)
    else:
        gradients = pruners.denoising_gradients

        def spy(*args):  # called as (teacher, name, data, inputs, seed, threshold, timesteps, scheduler)
            seen.append(args[7].config)
            return gradients(*args)
        monkeypatch.setattr(pruners, "denoising_gradients", spy)
    raw = _config(tmp_path)
    raw["pruning"]["pruner"] = pruner
    run_job(validate_config(raw), "prune", progress=False)
    assert seen and {(c.beta_schedule, c.beta_start, c.beta_end) for c in seen} == {("scaled_linear", 0.00085, 0.012)}
