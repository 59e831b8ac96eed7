"""Pruning surgery: physically smaller students for each diffusers family, and the safe save format."""

import copy
import json
import re
import warnings

import pytest
import torch
from helpers.tiny_models import BUILDERS

from nni_2ndmatch import load_pruned, prune_diffusers, pruned_class, save_pruned
from nni_2ndmatch.config import ConfigError, validate_config
from nni_2ndmatch.models import default_example_inputs
from nni_2ndmatch.models.builtin import ddpm_cifar10, tiny_unet
from nni_2ndmatch.nni import config_list_problems, default_config_list, nni_masks
from nni_2ndmatch.nni.config_list import CONFIG_LIST_KEYS, SETTING_KEYS
from nni_2ndmatch.pruning import denoising_gradients, masks_to_student

SLOW = pytest.mark.slow  # the quick loop (-m "not slow") runs one case of the costlier parametrisations


def _prune(model, ratio=0.3, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prune_diffusers(model, "magnitude", ratio, example_inputs=default_example_inputs(model, 2), **kw)


def out_width(module):
    return module.out_channels if isinstance(module, torch.nn.Conv2d) else module.out_features


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_each_family_gets_a_smaller_working_student_and_the_teacher_is_untouched(kind, tmp_path):
    teacher = BUILDERS[kind]().eval()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student, report = _prune(teacher, round_to=None)
    inputs = default_example_inputs(teacher, 3)
    assert student(**inputs).sample.shape == teacher(**inputs).sample.shape
    assert report["macs_after"] < report["macs_before"] and report["params_after"] < report["params_before"]
    assert sum(p.numel() for p in student.parameters()) == report["params_after"]
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    for name in ("conv_out", "proj_out_2"):
        if hasattr(teacher, name):
            assert out_width(getattr(student, name)) == out_width(getattr(teacher, name))
    for group in student.pruning_plan["groups"]:  # the plan says what the student really has
        assert out_width(student.get_submodule(group["root"])) == len(group["keep"])

    save_pruned(student, tmp_path / "student")
    assert sorted(p.name for p in (tmp_path / "student").iterdir()) == \
        ["config.json", "diffusion_pytorch_model.safetensors", "nni_2ndmatch.py"]
    loaded = load_pruned(tmp_path / "student")
    for (k, a), b in zip(student.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    assert torch.equal(student(**inputs).sample, loaded(**inputs).sample)


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_a_pruned_student_is_a_model_class_diffusers_loads_itself(kind, tmp_path):
    import diffusers

    import nni_2ndmatch
    from nni_2ndmatch import as_component
    from nni_2ndmatch.pruning import is_pruned_folder

    teacher = BUILDERS[kind]().eval()
    student, _ = _prune(teacher)
    inputs = default_example_inputs(teacher, 3)
    want = student(**inputs).sample
    as_component(student).save_pretrained(tmp_path / "s", safe_serialization=True)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    assert config["_class_name"] == "Pruned" + type(teacher).__name__ and config["pruning_plan"] == student.pruning_plan
    cls = getattr(nni_2ndmatch, config["_class_name"])  # where diffusers looks it up
    assert issubclass(cls, diffusers.ModelMixin) and issubclass(cls, type(teacher))
    for loaded in (cls.from_pretrained(tmp_path / "s", use_safetensors=True), load_pruned(tmp_path / "s")):
        assert type(loaded) is cls and not loaded.training and is_pruned_folder(tmp_path / "s")
        assert torch.equal(loaded(**inputs).sample, want)
        assert [len(g["keep"]) for g in loaded.pruning_plan["groups"]] == \
            [len(g["keep"]) for g in student.pruning_plan["groups"]]


def test_a_pipeline_with_a_pruned_student_loads_and_samples_with_diffusers_alone(tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline

    from nni_2ndmatch import as_component

    student, _ = _prune(BUILDERS["unet2d"]().eval())
    DDPMPipeline(unet=as_component(student), scheduler=DDPMScheduler()).save_pretrained(tmp_path / "p")
    assert json.loads((tmp_path / "p" / "model_index.json").read_text())["unet"] == \
        ["nni_2ndmatch", "PrunedUNet2DModel"]
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "p", use_safetensors=True)
    assert type(pipe.unet).__name__ == "PrunedUNet2DModel"
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 500])
    assert torch.equal(pipe.unet(x, t).sample, student(x, t).sample)
    images = pipe(num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 8, 8, 1) and ((0 <= images) & (images <= 1)).all()


PORTABLE_LOAD = """
import sys
sys.modules["nni_2ndmatch"] = None  # the package cannot be imported here
import torch
from diffusers import AutoModel, DiffusionPipeline
from safetensors.torch import load_file, save_file

out, inputs = {}, load_file(sys.argv[1] + "/inputs.safetensors")
for kind in sys.argv[2:]:
    model = AutoModel.from_pretrained(sys.argv[1] + "/" + kind, trust_remote_code=True)
    assert type(model).__module__.endswith("nni_2ndmatch"), type(model).__module__
    x = {k.split("/")[1]: v for k, v in inputs.items() if k.startswith(kind + "/")}
    out[kind] = model(**x).sample
pipe = DiffusionPipeline.from_pretrained(sys.argv[1] + "/pipeline", trust_remote_code=True)
out["images"] = torch.from_numpy(pipe(num_inference_steps=3, output_type="np",
                                      generator=torch.Generator().manual_seed(0)).images)
save_file(out, sys.argv[1] + "/outputs.safetensors")
"""


@pytest.mark.slow
def test_students_and_a_pipeline_load_and_sample_with_diffusers_alone_where_the_package_is_missing(tmp_path):
    import os
    import subprocess
    import sys

    from diffusers import DDPMPipeline, DDPMScheduler
    from safetensors.torch import load_file, save_file

    from nni_2ndmatch import load_pipeline
    from nni_2ndmatch.pruning import save_pipeline

    students, inputs = {}, {}
    for kind, builder in BUILDERS.items():
        teacher = builder().eval()
        students[kind], _ = _prune(teacher)
        save_pruned(students[kind], tmp_path / kind)
        inputs.update({f"{kind}/{k}": v for k, v in default_example_inputs(teacher, 2).items()})
    save_file(inputs, tmp_path / "inputs.safetensors")
    DDPMPipeline(unet=BUILDERS["unet2d"]().eval(), scheduler=DDPMScheduler()).save_pretrained(tmp_path / "dense")
    save_pipeline(students["unet2d"], tmp_path / "dense", tmp_path / "pipeline")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    subprocess.run([sys.executable, "-c", PORTABLE_LOAD, str(tmp_path), *BUILDERS], check=True, env=env,
                   cwd=tmp_path, timeout=300)
    got = load_file(tmp_path / "outputs.safetensors")
    for kind, student in students.items():  # the same function as the package's student (another process:
        x = {k.split("/")[1]: v for k, v in inputs.items() if k.startswith(kind + "/")}  # float32 rounding)
        with torch.no_grad():
            torch.testing.assert_close(got[kind], student(**x).sample, rtol=1e-5, atol=1e-6, msg=kind)
    pipe = load_pipeline(tmp_path / "pipeline")  # with the package: the same images
    assert type(pipe.unet).__module__ == "nni_2ndmatch"
    images = pipe(num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(got["images"], torch.from_numpy(images), atol=1e-6, rtol=0)  # float32 rounding


def test_the_package_never_runs_the_code_file_of_a_model_folder(tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler

    from nni_2ndmatch import load_pipeline
    from nni_2ndmatch.pruning import load_model_folder, save_pipeline

    student, _ = _prune(BUILDERS["unet2d"]().eval())
    DDPMPipeline(unet=BUILDERS["unet2d"]().eval(), scheduler=DDPMScheduler()).save_pretrained(tmp_path / "dense")
    save_pipeline(student, tmp_path / "dense", tmp_path / "pipeline")
    marker = tmp_path / "ran"
    (tmp_path / "pipeline" / "unet" / "nni_2ndmatch.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 500])
    for model in (load_pipeline(tmp_path / "pipeline").unet, load_model_folder(tmp_path / "pipeline"),
                  load_pruned(tmp_path / "pipeline" / "unet")):
        assert torch.equal(model(x, t).sample, student(x, t).sample)
    assert not marker.exists()


@pytest.mark.parametrize("kwargs", [{"dtype": torch.bfloat16},
                                    pytest.param({"torch_dtype": torch.bfloat16}, marks=SLOW),
                                    pytest.param({"dtype": {"unet": torch.bfloat16, "text_encoder": torch.bfloat16,
                                                            "vae": torch.bfloat16, "default": torch.float32}},
                                                 marks=SLOW)])
def test_load_pipeline_gives_the_pruned_denoiser_the_dtype_asked_for(tmp_path, kwargs):
    """diffusers casts the components it loads, not one it is given: load_pipeline casts the pruned
    denoiser it rebuilds the same way, so the pipeline samples."""
    from diffusers import DiffusionPipeline

    from nni_2ndmatch import load_pipeline
    from nni_2ndmatch.models import write_tiny_sd
    from nni_2ndmatch.pruning import save_pipeline

    teacher = write_tiny_sd(tmp_path / "teacher")
    student, _ = prune_diffusers(DiffusionPipeline.from_pretrained(teacher, use_safetensors=True).unet, "magnitude",
                                 0.3, round_to=None)
    save_pipeline(student, teacher, tmp_path / "pipeline")
    pipe = load_pipeline(tmp_path / "pipeline", **kwargs)
    assert {pipe.unet.dtype, pipe.vae.dtype} == {torch.bfloat16}
    images = pipe("a digit", num_inference_steps=2, guidance_scale=1.0, output_type="np", height=16, width=16,
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 16, 16, 3)


def test_a_pruned_structure_that_the_plan_does_not_give_is_a_clear_error(tmp_path):
    student, _ = _prune(BUILDERS["unet2d"]().eval())
    save_pruned(student, tmp_path / "s")
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    name, shape = next(iter(config["pruned_structure"]["shapes"].items()))
    config["pruned_structure"]["shapes"][name] = [shape[0] + 1, *shape[1:]]
    (tmp_path / "s" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"s/config.json: pruned_structure does not match what pruning_plan gives"):
        load_pruned(tmp_path / "s")
    with pytest.raises(ValueError, match=r"PrunedUNet2DModel config: pruned_structure does not match"):
        pruned_class("UNet2DModel").from_pretrained(tmp_path / "s")  # diffusers' own loader


def test_a_damaged_plan_in_a_pruned_class_config_is_a_clear_error(tmp_path):
    from nni_2ndmatch import as_component

    student, _ = _prune(BUILDERS["dit"]().eval())
    as_component(student).save_pretrained(tmp_path / "s", safe_serialization=True)
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    config["pruning_plan"]["groups"][0]["keep"] *= 2
    (tmp_path / "s" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"s/config.json: pruning_plan: groups\[0\]\.keep: index \d+ is listed twice"):
        load_pruned(tmp_path / "s")
    with pytest.raises(ValueError, match=r"PrunedDiTTransformer2DModel config: pruning_plan: groups\[0\]\.keep: index"
                                         r" \d+ is listed twice"):  # diffusers' own loader
        type(student).from_pretrained(tmp_path / "s")
    with pytest.raises(ValueError, match="has no pruning_plan"):
        as_component(BUILDERS["dit"]())


@pytest.mark.slow
def test_ddpm_cifar10_layout_at_0_3_matches_the_papers_student():
    student, report = _prune(ddpm_cifar10().eval())
    # the paper's Diff-Pruning student: 35.7M -> 19.8M parameters, 6.1G -> 3.4G MACs
    assert report["params_after"] == pytest.approx(19.8e6, rel=0.02)
    assert report["macs_after"] == pytest.approx(3.4e9, rel=0.03)


def test_round_to_keeps_widths_hardware_friendly_and_groupnorm_groups_equal():
    student, report = _prune(tiny_unet().eval(), round_to=8)
    for group in report["groups"]:
        assert group["kept"] % 8 == 0, group
    for m in student.modules():
        if isinstance(m, torch.nn.GroupNorm):
            assert m.num_channels % m.num_groups == 0


def test_deterministic_and_frozen_parameters_are_still_pruned():
    teacher = tiny_unet().eval()
    a, _ = _prune(teacher)
    teacher.requires_grad_(False)
    b, report = _prune(teacher)
    assert a.pruning_plan == b.pruning_plan
    assert report["params_after"] < report["params_before"]
    assert all(not p.requires_grad for p in teacher.parameters())


def test_achieved_ratio_far_from_the_asked_one_warns():
    with pytest.warns(UserWarning, match="more than 5 points from the asked one.*asked 0.3, got"):
        prune_diffusers(BUILDERS["unet2d"]().eval(), "magnitude", 0.3,
                        example_inputs=default_example_inputs(BUILDERS["unet2d"]()), round_to=8)


def test_bad_arguments_and_mismatched_plans_are_clear_errors(tmp_path):
    teacher = BUILDERS["unet2d"]().eval()
    with pytest.raises(ValueError, match="sparse_ratio=1.5 is not allowed"):
        _prune(teacher, ratio=1.5)
    with pytest.raises(ValueError, match="pruner='random' is unknown; allowed: magnitude, taylor, diff-pruning, L1"):
        prune_diffusers(teacher, "random", 0.3, example_inputs=default_example_inputs(teacher))
    student, _ = _prune(teacher, round_to=None)
    save_pruned(student, tmp_path / "s")
    save_pruned(student, tmp_path / "s")  # over its own earlier save: replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"'.*mine' holds other files \(notes.txt\) and no config.json, and writing "
                                         r"would replace it whole; give a new or empty folder"):
        save_pruned(student, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "x"
    with pytest.raises(ValueError, match=r"notes.txt' is a file, and writing the folder would replace it"):
        save_pruned(student, tmp_path / "mine" / "notes.txt")
    (tmp_path / "mine" / "notes.txt").unlink()
    (tmp_path / "mine" / ".DS_Store").write_text("")
    save_pruned(student, tmp_path / "mine")  # a hidden file of the system's is not the user's work
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    config["pruning_plan"]["groups"][0]["root"] = "down_blocks.7.conv"
    (tmp_path / "s" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not match the UNet2DModel architecture"):
        load_pruned(tmp_path / "s")
    with pytest.raises(ValueError, match="not a pruned-student folder: diffusion_pytorch_model.safetensors is missing"):
        (tmp_path / "s" / "diffusion_pytorch_model.safetensors").unlink()
        load_pruned(tmp_path / "s")
    with pytest.raises(ValueError, match="has no pruning_plan"):
        save_pruned(teacher, tmp_path / "dense")


@pytest.mark.parametrize("pruner", ["L1NormPruner", pytest.param("L2NormPruner", marks=SLOW),
                                    pytest.param("FPGMPruner", marks=SLOW)])
def test_nni_pruners_by_name_decide_which_channels_go(pruner):
    teacher = tiny_unet().eval()
    inputs = default_example_inputs(teacher, 2)
    masks = nni_masks(teacher, pruner, default_config_list(teacher, 0.3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        student, report = prune_diffusers(teacher, pruner, 0.3, example_inputs=inputs, round_to=None)
        again, _ = masks_to_student(teacher, masks, inputs, round_to=None)
    assert again.pruning_plan == student.pruning_plan
    assert report["macs_after"] < 0.8 * report["macs_before"]
    assert student(**inputs).sample.shape == teacher(**inputs).sample.shape
    # a group whose only masked layer is its root keeps exactly the channels NNI kept
    nni_kept = (masks["time_embedding.linear_1"]["weight"].flatten(1).abs().sum(1) > 0).nonzero().flatten().tolist()
    plan = {g["root"]: g["keep"] for g in student.pruning_plan["groups"]}
    assert plan["time_embedding.linear_1"] == nni_kept


def test_masks_without_pruned_channels_leave_the_model_whole():
    teacher = tiny_unet().eval()
    masks = {name: {"weight": torch.ones_like(m.weight)} for name, m in teacher.named_modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    student, report = masks_to_student(teacher, masks)
    assert report["params_after"] == report["params_before"] and student.pruning_plan["groups"] == []


def _row_mask(layer, keep):
    mask = torch.zeros_like(layer.weight)
    mask[keep] = 1
    return {"weight": mask}


def test_the_report_says_how_far_the_student_keeps_what_the_masks_keep(caplog):
    """conv_in shares its channels with the first resnet's conv2 (the residual sum), in 8 GroupNorm
    groups of 4 that must each keep the same count. Masks that keep disjoint halves agree with any
    choice on half of it; a coupled layer without a mask is named; a mask the groups cannot follow
    (the first 16 channels) shows as low agreement."""
    teacher = tiny_unet().eval()
    conv_in, conv2 = teacher.conv_in, teacher.down_blocks[0].resnets[0].conv2
    width = conv_in.out_channels
    first, second = [i for i in range(width) if i % 4 < 2], [i for i in range(width) if i % 4 >= 2]
    halves = {"conv_in": _row_mask(conv_in, first), "down_blocks.0.resnets.0.conv2": _row_mask(conv2, second)}
    _, report = masks_to_student(teacher, halves, round_to=None)
    (group,) = report["groups"]
    assert group["root"] == "conv_in" and group["kept"] == width // 2 and group["chunks"] == 8
    assert group["mask_agreement"] == 0.5 and report["mask_agreement"] == 0.5
    assert group["pruned_without_mask"] == []

    with caplog.at_level("WARNING", logger="nni_2ndmatch"):
        student, report = masks_to_student(teacher, {"conv_in": halves["conv_in"]}, round_to=None)
    (group,) = report["groups"]
    assert group["mask_agreement"] == 1.0 and group["pruned_without_mask"] == ["down_blocks.0.resnets.0.conv2"]
    assert student.pruning_plan["groups"][0]["keep"] == first
    assert student.down_blocks[0].resnets[0].conv2.out_channels == width // 2  # coupled: it loses them too
    assert "1 layer(s) without a mask lose output channels, coupled to masked layers" in caplog.text
    assert "down_blocks.0.resnets.0.conv2" in caplog.text

    _, report = masks_to_student(teacher, {"conv_in": _row_mask(conv_in, slice(0, width // 2))}, round_to=None)
    assert report["groups"][0]["mask_agreement"] == 0.5  # 2 of each group's 4, but NNI kept 4 or 0

    caplog.clear()  # one channel masked: whole GroupNorm groups keep all 32, so nothing is lost
    with caplog.at_level("WARNING", logger="nni_2ndmatch"):
        student, report = masks_to_student(teacher, {"conv_in": _row_mask(conv_in, slice(1, None))}, round_to=None)
    assert report["groups"][0]["kept"] == width and report["groups"][0]["pruned_without_mask"] == []
    assert "without a mask lose output channels" not in caplog.text


def test_an_nni_pruners_masks_agree_with_the_student_where_one_layer_decides():
    teacher = tiny_unet().eval()
    masks = nni_masks(teacher, "L1NormPruner", default_config_list(teacher, 0.3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, report = masks_to_student(teacher, masks, round_to=None)
    groups = {g["root"]: g for g in report["groups"]}
    assert groups["time_embedding.linear_1"]["mask_agreement"] == 1.0
    assert all(g["pruned_without_mask"] == [] for g in report["groups"])  # the default selects every layer
    assert 0.5 < report["mask_agreement"] <= 1.0


def test_an_unknown_nni_pruner_or_missing_data_is_a_clear_error():
    teacher = BUILDERS["unet2d"]().eval()
    inputs = default_example_inputs(teacher)
    with pytest.raises(ValueError, match="pruner='NoSuchPruner' is unknown; allowed: magnitude"):
        prune_diffusers(teacher, "NoSuchPruner", 0.3, example_inputs=inputs)
    with pytest.raises(ValueError, match="pruner='LevelPruner' is not supported by name.*masks_to_student"):
        prune_diffusers(teacher, "LevelPruner", 0.3, example_inputs=inputs)
    for pruner in ("taylor", "diff-pruning", "TaylorPruner"):
        with pytest.raises(ValueError, match=f"pruner={pruner!r} needs data: its importance uses gradients"):
            prune_diffusers(teacher, pruner, 0.3, example_inputs=inputs)


def _calibration(n=6, seed=0):
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


#: the reference DDPM schedule, written out, and SD's and SDXL's
SCHEDULES = {"reference": dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
             "sdxl": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)}


def _loss(model, x0, t, noise, schedule="reference"):
    from diffusers import DDPMScheduler

    from nni_2ndmatch.method import model_output

    sched = DDPMScheduler(num_train_timesteps=1000, **SCHEDULES[schedule])
    return (model_output(model, sched.add_noise(x0, noise, t), t.float()) - noise).pow(2).flatten(1).sum(1).mean()


def _explicit_gradients(model, x0, t, noise, schedule="reference"):
    model = copy.deepcopy(model)
    loss = _loss(model, x0, t, noise, schedule)
    return dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters()))))


@pytest.mark.parametrize("schedule", ["reference", "sdxl"])
def test_taylor_gradients_are_those_of_the_denoising_loss_on_the_teachers_schedule(schedule):
    from diffusers import DDPMScheduler

    teacher, x0 = BUILDERS["unet2d"]().eval(), _calibration()
    given = None if schedule == "reference" else DDPMScheduler(num_train_timesteps=1000, **SCHEDULES[schedule])
    grads, used = denoising_gradients(teacher, "taylor", x0, default_example_inputs(teacher), 3, 0.05, 20, given)
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, 1000, (6,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    ref = _explicit_gradients(teacher, x0, t, noise, schedule)
    assert used == t.tolist() and set(grads) == set(ref)
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name], rtol=1e-4, atol=1e-6)
    other = _explicit_gradients(teacher, x0, t, noise, "sdxl" if schedule == "reference" else "reference")
    assert any(not torch.allclose(grads[n], other[n], rtol=1e-2, atol=1e-4) for n in ref)  # the schedule matters


def test_the_gradient_pruners_refuse_a_schedule_that_does_not_predict_the_noise():
    from diffusers import DDPMScheduler

    teacher, x0 = BUILDERS["unet2d"]().eval(), _calibration()
    with pytest.raises(ValueError, match="pruner='taylor' scores channels by the gradients of the noise-prediction "
                                         "loss; the scheduler's prediction_type is 'v_prediction'; allowed: 'epsilon'"):
        denoising_gradients(teacher, "taylor", x0, default_example_inputs(teacher), 0, 0.05, 20,
                            DDPMScheduler(prediction_type="v_prediction"))


def test_diff_pruning_sums_gradients_over_timesteps_until_the_loss_falls_below_the_threshold():
    teacher, x0 = BUILDERS["unet2d"]().eval(), _calibration()
    inputs = default_example_inputs(teacher)
    grads, used = denoising_gradients(teacher, "diff-pruning", x0, inputs, 0, 0.0, 2)
    g = torch.Generator().manual_seed(0)
    ref = [_explicit_gradients(teacher, x0, torch.full((6,), t), torch.randn(x0.shape, generator=g)) for t in (0, 999)]
    assert used == [0, 999]
    for name in grads:
        torch.testing.assert_close(grads[name], ref[0][name] + ref[1][name], rtol=1e-4, atol=1e-6)
    # the stopping rule, against the per-timestep losses computed here
    g, losses, expected = torch.Generator().manual_seed(0), [], []
    for t in torch.linspace(0, 999, 5).round().long().tolist():
        noise = torch.randn(x0.shape, generator=g)
        losses.append(_loss(teacher, x0, torch.full((6,), t), noise).item())
        if losses[-1] < 0.99 * max(losses):
            break
        expected.append(t)
    _, used = denoising_gradients(teacher, "diff-pruning", x0, inputs, 0, 0.99, 5)
    assert used == expected and len(used) < 5


@pytest.mark.parametrize("pruner", ["taylor", pytest.param("diff-pruning", marks=SLOW),
                                    pytest.param("TaylorPruner", marks=SLOW)])
def test_gradient_pruners_are_deterministic_leave_the_teacher_alone_and_ignore_frozen_flags(pruner):
    teacher, x0 = BUILDERS["unet2d"]().eval(), _calibration()
    inputs = default_example_inputs(teacher)
    before = copy.deepcopy(teacher.state_dict())
    a, report = prune_diffusers(teacher, pruner, 0.5, example_inputs=inputs, data=x0, round_to=None)
    for p in teacher.parameters():
        p.requires_grad_(False)
    b, _ = prune_diffusers(teacher, pruner, 0.5, example_inputs=inputs, data=x0, round_to=None)
    assert a.pruning_plan == b.pruning_plan and report["macs_ratio"] < 0.6
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in teacher.parameters()) and all(p.grad is None for p in a.parameters())
    assert all(not p.requires_grad for p in teacher.parameters())
    magnitude, _ = prune_diffusers(teacher, "magnitude", 0.5, example_inputs=inputs, round_to=None)
    assert a.pruning_plan != magnitude.pruning_plan  # the gradients changed the choice


# --- a damaged pruned-student folder -----------------------------------------------------------


@pytest.fixture(scope="module")
def saved_student(tmp_path_factory):
    """A tiny pruned UNet2DModel saved once; tests copy it and damage the copy."""
    folder = tmp_path_factory.mktemp("saved") / "student"
    student, _ = _prune(BUILDERS["unet2d"]().eval(), round_to=None)
    save_pruned(student, folder)
    return folder


def _damaged(saved, tmp_path, edit):
    import shutil

    folder = tmp_path / "student"
    shutil.copytree(saved, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "pruning_plan": edit(config["pruning_plan"])}))
    return folder


def _group(plan, root):
    return next(g for g in plan["groups"] if g["root"] == root)


def _set(plan, root, key, value):
    _group(plan, root)[key] = value
    return plan


def _set_index(plan, root, position, value):
    _group(plan, root)["keep"][position] = value
    return plan


def _plan_entry(plan, root):
    return rf"groups\[{plan['groups'].index(_group(plan, root))}\]"


LINEAR = "time_embedding.linear_2"  # a Linear of width 32 in the tiny UNet2DModel


@pytest.mark.parametrize("edit, expected", [
    (lambda p: [p], "the plan must be an object, got a list"),
    (lambda p: {**p, "layers": []}, "unknown key 'layers'; allowed: groups, version"),
    (lambda p: {"version": 1}, "required key 'groups' is missing"),
    (lambda p: {**p, "groups": {"root": LINEAR}}, "groups: expected a list of objects, got an object"),
    (lambda p: {**p, "groups": [[LINEAR, [0, 1]]]},
     r"groups\[0\]: expected an object with 'root' and 'keep', got a list"),
    (lambda p: _set(p, LINEAR, "kept", [0]), "{entry}: unknown key 'kept'; allowed: keep, root"),
    (lambda p: _set(p, LINEAR, "keep", 5), "{entry}.keep: expected a list of channel indices, got an integer"),
    (lambda p: _set(p, LINEAR, "keep", []), "{entry}.keep: keeps no channel"),
    (lambda p: _set_index(p, LINEAR, 1, "2"),
     r"{entry}.keep\[1\]: value '2' is not allowed: a channel index is an integer, got a string"),
    (lambda p: _set_index(p, LINEAR, 1, 2.0), r"{entry}.keep\[1\]: .*got a number"),
    (lambda p: _set_index(p, LINEAR, 1, _group(p, LINEAR)["keep"][0]), "{entry}.keep: index 0 is listed twice"),
    (lambda p: _set(p, LINEAR, "keep", list(range(33))), r"{entry}.keep: 33 indices are too many for width 32"),
    (lambda p: _set_index(p, LINEAR, -1, 70),
     r"{entry}.keep: index 70 is out of range for width 32 \(time_embedding.linear_2\); allowed: 0 to 31"),
    (lambda p: _set_index(p, LINEAR, 0, -1), "{entry}.keep: index -1 is out of range for width 32"),
    (lambda p: _set(p, LINEAR, "root", 7), r"{entry}.root: value 7 is not allowed: it must be a layer name"),
    (lambda p: _set(p, LINEAR, "root", "time_embedding.linear_9"),
     "{entry}.root: 'time_embedding.linear_9' does not match the UNet2DModel architecture"
     ".*did you mean 'time_embedding"),
    (lambda p: {**p, "groups": p["groups"] + [p["groups"][0]]}, r"groups\[\d+\].root: layer .* has two groups"),
    (lambda p: {**p, "version": 2}, "version=2 is not supported; allowed: 1"),
])
def test_a_damaged_plan_is_a_value_error_naming_the_file_and_the_entry(saved_student, tmp_path, edit, expected):
    plan = json.loads((saved_student / "config.json").read_text())["pruning_plan"]
    folder = _damaged(saved_student, tmp_path, edit)
    with pytest.raises(ValueError) as e:
        load_pruned(folder)
    assert str(e.value).startswith(f"{folder / 'config.json'}: pruning_plan: "), e.value
    assert re.search(expected.format(entry=_plan_entry(plan, LINEAR)), str(e.value)), e.value


def test_malformed_json_and_weights_that_do_not_match_the_plan_are_clear_errors(saved_student, tmp_path):
    folder = _damaged(saved_student, tmp_path, lambda p: p)
    (folder / "config.json").write_text('{"version": 1, "groups": [')
    with pytest.raises(ValueError, match=r"config.json is not valid JSON"):
        load_pruned(folder)
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config.json: the top level must be an object, got a list"):
        load_pruned(folder)
    # a well-formed plan keeping one channel fewer than the saved weights have
    other = _damaged(saved_student, tmp_path / "other",
                     lambda p: _set(p, LINEAR, "keep", _group(p, LINEAR)["keep"][1:]))
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model.safetensors does not match .*config.json: "
                                         r"pruning_plan: \d+ of another "
                                         r"shape, e.g. 'time_embedding.linear_2.weight': saved \[22, \d+\], "
                                         r"the plan gives \[21, \d+\]"):
        load_pruned(other)


# --- NNI config_list ---------------------------------------------------------------------------


def _config(pruning):
    raw = {"model": {"teacher": {"builtin": "tiny-unet"}}, "output_dir": "unused", "pruning": pruning}
    return validate_config(raw)


def _problems(pruning):
    with pytest.raises(ConfigError) as e:
        _config(pruning)
    return "\n".join(e.value.problems)


CONV = {"op_types": ["Conv2d"], "sparse_ratio": 0.5}


@pytest.mark.parametrize("pruning, expected", [
    ({"config_list": [{"op_types": ["Conv2d"], "sparse_ratio": 1.5}]},
     r"config_list\[0\].sparse_ratio: value 1.5 is not allowed: it must be in \(0, 1\)"),
    ({"config_list": [{"op_types": ["Conv2d"], "sparse_ratio": 0}]}, r"config_list\[0\].sparse_ratio: value 0 is not"),
    ({"config_list": [{**CONV, "max_sparse_ratio": 1.2}]}, r"max_sparse_ratio: value 1.2 .* must be in \(0, 1\]"),
    ({"config_list": [{**CONV, "min_sparse_ratio": 0.6, "max_sparse_ratio": 0.4}]},
     r"config_list\[0\]: min_sparse_ratio=0.6 is above max_sparse_ratio=0.4"),
    ({"config_list": [["Conv2d", 0.5]]},
     r"config_list\[0\]: expected a mapping \(op_types, sparse_ratio, ...\), got a list"),
    ({"config_list": {"op_types": ["Conv2d"]}}, "config_list: expected a list of mappings, got a mapping"),
    ({"config_list": []}, "config_list: the list is empty"),
    ({"config_list": [CONV, {**CONV, "op_name": ["conv_in"]}]},
     r"config_list\[1\].op_name: unknown key; did you mean 'op_names'\? \(allowed: op_types, op_names,"),
    ({"config_list": [{"op_types": ["Conv2d"], "sparsity": 0.5}]},
     r"config_list\[0\].sparsity: 'sparsity' is a pre-3.0 NNI key; use sparse_ratio"),
    ({"config_list": [{"op_types": "Conv2d", "sparse_ratio": 0.5}]},
     r"config_list\[0\].op_types: value 'Conv2d' is not allowed: it must be a list of strings"),
    ({"config_list": [{"op_names": ["conv_in", 3], "sparse_ratio": 0.5}]}, r"config_list\[0\].op_names: value"),
    ({"config_list": [{"op_names_re": ["down_blocks.("], "sparse_ratio": 0.5}]},
     r"config_list\[0\].op_names_re\[0\]: value 'down_blocks.\(' is not a regular expression"),
    ({"config_list": [{"sparse_ratio": 0.5}]}, r"config_list\[0\]: give op_types, op_names or op_names_re"),
    ({"config_list": [{"op_types": ["Conv2d"]}]}, r"config_list\[0\]: give sparse_ratio or sparse_threshold"),
    ({"config_list": [{**CONV, "sparse_threshold": 0.1}]},
     r"config_list\[0\]: give sparse_ratio or sparse_threshold, not both"),
    ({"config_list": [{**CONV, "granularity": "in_channel"}]},
     r"config_list\[0\].granularity: value 'in_channel' is not allowed: .*allowed: default, out_channel"),
    ({"config_list": [{**CONV, "global_group_id": True}]}, r"global_group_id: value True .* an integer or a string"),
    ({"config_list": [{**CONV, "target_names": ["bias"]}]}, r"target_names: value \['bias'\] .* must include 'weight'"),
    ({"config_list": [{"op_types": ["Conv2d"], "target_settings": {"weight": {"sparse_ratio": 2, "ratio": 1}}}]},
     r"config_list\[0\].target_settings.weight.ratio: unknown key.*"
     r"config_list\[0\].target_settings.weight.sparse_ratio: value 2 is not allowed"),
    ({"config_list": [{"op_types": ["Conv2d"], "target_settings": {"weight": 0.5}}]},
     r"config_list\[0\].target_settings.weight: expected a mapping of settings"),
    ({"sparse_ratio": 0.3, "config_list": [CONV]}, "give sparse_ratio or config_list, not both"),
    ({"pruner": "magnitude", "config_list": [CONV]},
     r"config_list is for the NNI pruners .*pruner='magnitude' \(a torch-pruning importance\) would ignore it"),
])
def test_a_bad_config_list_is_a_config_error_naming_the_entry(pruning, expected):
    text = _problems(pruning)
    assert text.startswith("pruning"), text
    assert re.search(expected, text, re.S), text


def test_a_good_config_list_is_accepted_and_every_problem_is_reported_at_once():
    entries = [{"op_types": ["Conv2d", "Linear"], "exclude_op_names": ["conv_out"], "sparse_ratio": 0.4},
               {"op_names_re": ["down_blocks\\..*"], "target_names": ["weight"],
                "target_settings": {"weight": {"sparse_ratio": 0.2, "max_sparse_ratio": 1.0,
                                               "granularity": "out_channel"}},
                "dependency_group_id": "a"},
               {"op_names": ["conv_in"], "sparse_threshold": 1, "min_sparse_ratio": 0.0}]
    assert _config({"pruner": "L2NormPruner", "config_list": entries}).pruning.config_list == entries
    problems = config_list_problems([{"op_types": ["Conv2d"], "sparse_ratio": 1.5, "foo": 1}, 3])
    assert [p.split(":")[0] for p in problems] == \
        ["config_list[0].foo", "config_list[0].sparse_ratio", "config_list[1]"]


def _schema_keys(schema) -> set:
    """Every key a `schema` dict (nested in Optional/Or) names."""
    keys = set()
    for key in schema:
        inner = getattr(key, "schema", key)
        keys.update(getattr(inner, "args", (inner,)))
    return keys


def test_the_accepted_keys_are_nni_3_pruning_keys():
    from nni.compression.base.config import default_config_schema

    schema = default_config_schema("pruning").schema
    assert set(CONFIG_LIST_KEYS) <= _schema_keys(schema)
    setting = next(v for k, v in schema.items() if getattr(k, "schema", k) == "target_settings")
    assert set(SETTING_KEYS) <= _schema_keys(next(iter(setting.values())))


@pytest.mark.parametrize("entry, expected", [
    ({"op_types": ["Conv3d"], "sparse_ratio": 0.3},
     r"config_list\[0\].op_types: 'Conv3d' is not a layer type of this UNet2DModel; did you mean 'Conv2d'\? "
     r"\(types present: .*GroupNorm.*Linear"),
    ({"op_types": ["Conv2d"], "exclude_op_names": ["conv_output"], "sparse_ratio": 0.3},
     r"config_list\[0\].exclude_op_names: 'conv_output' is not a module of this UNet2DModel; did you mean 'conv_out'"),
    ({"op_names": ["down_blocks.0.resnets.0.conv3"], "sparse_ratio": 0.3},
     r"config_list\[0\].op_names: 'down_blocks.0.resnets.0.conv3' is not a module .*did you mean "
     r"'down_blocks.0.resnets.0.conv\d'"),
    ({"op_names_re": ["encoder\\..*"], "sparse_ratio": 0.3},
     r"config_list\[0\].op_names_re: 'encoder\\\\..\*' matches no module name of this UNet2DModel"),
    ({"op_types": ["Conv2d"], "sparse_ratio": 1.5}, r"config_list\[0\].sparse_ratio: value 1.5 is not allowed"),
    ({"op_types": ["GroupNorm"], "sparse_ratio": 0.3},  # NNI would stop on an AssertionError
     r"config_list\[0\].op_types: 'GroupNorm' is not allowed: the student loses output channels of Conv2d and "
     r"Linear layers only; allowed: Conv2d, Linear"),
    ({"op_names": ["down_blocks.0.resnets.0.norm1"], "sparse_ratio": 0.3},
     r"config_list\[0\].op_names: 'down_blocks.0.resnets.0.norm1' is a GroupNorm, which is not allowed"),
    ({"op_names_re": ["down_blocks.0.resnets.0.norm"], "sparse_ratio": 0.3},
     r"config_list\[0\]: selects 'down_blocks.0.resnets.0.norm1', a GroupNorm \(and 1 more\), which is not allowed.*"
     r"add op_types: \[Conv2d, Linear\]"),
    ({"op_types": ["Linear"], "op_names": ["conv_in"], "sparse_ratio": 0.3},
     r"config_list\[0\]: selects no layer of this UNet2DModel .* so it would prune nothing"),
    ({"op_types": ["Conv2d"], "exclude_op_names_re": [".*"], "sparse_ratio": 0.3}, r"selects no layer"),
])
def test_prune_diffusers_checks_the_config_list_against_the_model(entry, expected):
    teacher = BUILDERS["unet2d"]().eval()
    with pytest.raises(ValueError, match=expected):
        prune_diffusers(teacher, "L1NormPruner", example_inputs=default_example_inputs(teacher), config_list=[entry])


def test_prune_diffusers_refuses_a_config_list_a_torch_pruning_importance_would_ignore():
    teacher = BUILDERS["unet2d"]().eval()
    with pytest.raises(ValueError, match="config_list is for the NNI pruners.*pruner='magnitude'"):
        prune_diffusers(teacher, "magnitude", example_inputs=default_example_inputs(teacher), config_list=[CONV])


def test_the_report_records_what_was_asked_for():
    teacher = tiny_unet().eval()
    _, report = _prune(teacher, 0.4)
    assert (report["pruner"], report["sparse_ratio"], report["config_list"]) == ("magnitude", 0.4, None)
    entries = [{"op_types": ["Conv2d"], "exclude_op_names": ["conv_out"], "sparse_ratio": 0.5}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, report = prune_diffusers(teacher, "L1NormPruner", example_inputs=default_example_inputs(teacher),
                                    config_list=entries, round_to=None)
    assert (report["pruner"], report["sparse_ratio"], report["config_list"]) == ("L1NormPruner", None, entries)
    assert json.loads(json.dumps(report))["config_list"] == entries  # pruning_report.json holds it as given


def test_a_student_saved_in_the_earlier_format_still_loads(tmp_path):
    """model.safetensors + the dense config.json + pruning_plan.json, as this package wrote them before."""
    from nni_2ndmatch.files import save_tensors

    student, _ = _prune(BUILDERS["unet2d"]().eval(), round_to=None)
    folder = tmp_path / "old"
    folder.mkdir()
    save_tensors(folder / "model.safetensors", student.state_dict())
    config = {k: v for k, v in dict(student.config).items() if k != "pruning_plan"}
    (folder / "config.json").write_text(json.dumps({**config, "_class_name": "UNet2DModel"}, default=list))
    (folder / "pruning_plan.json").write_text(json.dumps(student.pruning_plan))
    loaded = load_pruned(folder)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 700])
    assert type(loaded).__name__ == "PrunedUNet2DModel" and torch.equal(loaded(x, t).sample, student(x, t).sample)
    plan = json.loads((folder / "pruning_plan.json").read_text())
    plan["version"] = 2
    (folder / "pruning_plan.json").write_text(json.dumps(plan))
    with pytest.raises(ValueError, match=r"old/pruning_plan.json: version=2 is not supported"):
        load_pruned(folder)


def test_a_registered_pruner_is_one_the_config_and_prune_diffusers_take():
    from nni_2ndmatch.nni import PRUNER_REGISTRY, PrunerSpec, register_pruner
    from nni_2ndmatch.pruning import magnitude_scores, prune_with_scores

    asked = []

    def smallest_first(r):
        asked.append((r.sparse_ratio, r.seed))
        return prune_with_scores(r.teacher, lambda group, names: (-magnitude_scores(group), r.sparse_ratio),
                                 r.example_inputs, r.round_to)

    raw = {"model": {"teacher": {"builtin": "digits-teacher"}}, "data": {"builtin": "digits"},
           "pruning": {"pruner": "largest-go", "sparse_ratio": 0.3}, "finetune": {"finetuner": "kd", "steps": 1},
           "output_dir": "unused"}
    with pytest.raises(ConfigError, match="pruner='largest-go' is unknown"):
        validate_config(raw)
    register_pruner(PrunerSpec("largest-go", smallest_first))
    try:
        _check_the_registered_pruner(raw, smallest_first, asked)
    finally:
        del PRUNER_REGISTRY["largest-go"]


def _check_the_registered_pruner(raw, run, asked):
    from nni_2ndmatch.nni import PrunerSpec, register_pruner

    assert validate_config(raw).pruning.pruner == "largest-go"
    with pytest.raises(ValueError, match="pruner 'largest-go' is already registered"):
        register_pruner(PrunerSpec("largest-go", run))

    teacher = tiny_unet().eval()
    inputs = default_example_inputs(teacher)
    ours, _ = prune_diffusers(teacher, "largest-go", 0.5, example_inputs=inputs, round_to=None)
    magnitude, _ = prune_diffusers(teacher, "magnitude", 0.5, example_inputs=inputs, round_to=None)
    assert asked == [(0.5, 0)]
    shapes = lambda m: {k: v.shape for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(ours) == shapes(magnitude)  # the same widths, other channels kept
    assert any(not torch.equal(a, b) for a, b in zip(ours.state_dict().values(), magnitude.state_dict().values()))


def test_masks_the_student_cannot_apply_are_named_not_dropped_silently(caplog):
    """NNI masks what a config_list selects; masks of the residual width (a DiT's patch embedding,
    attention output and MLP output) have no group the surgery may cut: the report names them."""
    from nni_2ndmatch import masks_to_student

    teacher = BUILDERS["dit"]().eval()
    residual = ["pos_embed.proj", "transformer_blocks.0.attn1.to_out.0", "transformer_blocks.0.ff.net.2"]
    masks = nni_masks(teacher, "L1NormPruner", [{"op_names": residual, "sparse_ratio": 0.5}])
    assert all((masks[name]["weight"] == 0).any() for name in residual)  # NNI did mask them
    with caplog.at_level("WARNING", logger="nni_2ndmatch"):
        student, report = masks_to_student(teacher, masks, default_example_inputs(teacher, 2), round_to=None)
    assert report["masks_not_applied"] == sorted(residual) and report["groups"] == []
    assert "the masks of 3 layer(s) prune nothing in the student" in caplog.text
    applied = nni_masks(teacher, "L1NormPruner", default_config_list(teacher, 0.5))
    _, report = masks_to_student(teacher, {"transformer_blocks.0.ff.net.0.proj": applied[
        "transformer_blocks.0.ff.net.0.proj"]}, default_example_inputs(teacher, 2), round_to=None)
    assert report["masks_not_applied"] == [] and report["groups"]


def test_the_pipeline_out_carries_what_loading_reads_not_the_teachers_other_weights(tmp_path):
    """A downloaded SD folder holds single-file checkpoints, pickled and fp16 copies of each
    component and a hub cache: none of it goes into the pruned pipeline (gigabytes of dense teacher),
    the license does, and the pipeline loads with diffusers and with the package."""
    from diffusers import DiffusionPipeline

    from nni_2ndmatch import load_pipeline
    from nni_2ndmatch.models import write_tiny_sd
    from nni_2ndmatch.pruning import save_pipeline

    teacher = write_tiny_sd(tmp_path / "teacher")
    junk = ["v1-5-pruned-emaonly.ckpt", "v1-5-pruned.safetensors", ".cache/huggingface/x.lock", "notes/a.txt",
            "scheduler/scheduler.bin", "vae/diffusion_pytorch_model.fp16.safetensors",
            "text_encoder/pytorch_model.bin", "text_encoder/model.safetensors.index.fp16.json",
            "text_encoder/flax_model.msgpack", "vae/.cache/y"]
    for name in [*junk, "LICENSE.md"]:
        (teacher / name).parent.mkdir(parents=True, exist_ok=True)
        (teacher / name).write_text("x")
    unet = DiffusionPipeline.from_pretrained(teacher, use_safetensors=True).unet
    student, _ = prune_diffusers(unet, "magnitude", 0.3, round_to=None)
    save_pipeline(student, teacher, tmp_path / "pipeline")

    def files(root, skip=""):
        return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not str(p.relative_to(root))
                .startswith(skip)}

    assert files(tmp_path / "pipeline", "unet/") == files(teacher, "unet/") - set(junk)  # LICENSE.md included
    loaded = load_pipeline(tmp_path / "pipeline")
    assert sum(p.numel() for p in loaded.unet.parameters()) == sum(p.numel() for p in student.parameters())
    DiffusionPipeline.from_pretrained(tmp_path / "pipeline", trust_remote_code=True)  # diffusers alone reads it too
