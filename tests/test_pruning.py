"""Pruning surgery: physically smaller students for each diffusers family, and the safe save format."""

import copy
import json
import warnings

import pytest
import torch
from tiny_models import BUILDERS

from nni_2ndmatch import load_pruned, prune_diffusers, save_pruned
from nni_2ndmatch.models import ddpm_cifar10, tiny_unet
from nni_2ndmatch.pruning import (
    _denoising_gradients,
    default_config_list,
    default_example_inputs,
    masks_to_student,
    nni_masks,
)


def _prune(model, ratio=0.3, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prune_diffusers(model, "magnitude", ratio, example_inputs=default_example_inputs(model, 2), **kw)


def _out_width(module):
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
            assert _out_width(getattr(student, name)) == _out_width(getattr(teacher, name))
    for group in student.pruning_plan["groups"]:  # the plan says what the student really has
        assert _out_width(student.get_submodule(group["root"])) == len(group["keep"])

    save_pruned(student, tmp_path / "student")
    assert sorted(p.name for p in (tmp_path / "student").iterdir()) == \
        ["config.json", "model.safetensors", "pruning_plan.json"]
    loaded = load_pruned(tmp_path / "student")
    for (k, a), b in zip(student.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    assert torch.equal(student(**inputs).sample, loaded(**inputs).sample)


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
    with pytest.raises(ValueError, match="pruner=.random. is not an NNI pruner class"):
        prune_diffusers(teacher, "random", 0.3, example_inputs=default_example_inputs(teacher))
    student, _ = _prune(teacher, round_to=None)
    save_pruned(student, tmp_path / "s")
    plan = json.loads((tmp_path / "s" / "pruning_plan.json").read_text())
    plan["groups"][0]["root"] = "down_blocks.7.conv"
    (tmp_path / "s" / "pruning_plan.json").write_text(json.dumps(plan))
    with pytest.raises(ValueError, match="does not match the UNet2DModel architecture"):
        load_pruned(tmp_path / "s")
    with pytest.raises(ValueError, match="not a pruned-student folder: model.safetensors is missing"):
        (tmp_path / "s" / "model.safetensors").unlink()
        load_pruned(tmp_path / "s")
    with pytest.raises(ValueError, match="has no pruning_plan"):
        save_pruned(teacher, tmp_path / "dense")


@pytest.mark.parametrize("pruner", ["L1NormPruner", "L2NormPruner", "FPGMPruner"])
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


def test_an_unknown_nni_pruner_or_missing_data_is_a_clear_error():
    teacher = BUILDERS["unet2d"]().eval()
    inputs = default_example_inputs(teacher)
    with pytest.raises(ValueError, match="pruner='NoSuchPruner' is not an NNI pruner class"):
        prune_diffusers(teacher, "NoSuchPruner", 0.3, example_inputs=inputs)
    with pytest.raises(ValueError, match="pruner='LevelPruner' is not supported by name.*masks_to_student"):
        prune_diffusers(teacher, "LevelPruner", 0.3, example_inputs=inputs)
    for pruner in ("taylor", "diff-pruning", "TaylorPruner"):
        with pytest.raises(ValueError, match=f"pruner={pruner!r} needs data: its importance uses gradients"):
            prune_diffusers(teacher, pruner, 0.3, example_inputs=inputs)


def _calibration(n=6, seed=0):
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def _loss(model, x0, t, noise):
    from diffusers import DDPMScheduler

    from nni_2ndmatch.losses import model_output

    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    return (model_output(model, sched.add_noise(x0, noise, t), t.float()) - noise).pow(2).flatten(1).sum(1).mean()


def _explicit_gradients(model, x0, t, noise):
    model = copy.deepcopy(model)
    loss = _loss(model, x0, t, noise)
    return dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters()))))


def test_taylor_gradients_are_those_of_the_denoising_loss():
    teacher, x0 = BUILDERS["unet2d"]().eval(), _calibration()
    grads, used = _denoising_gradients(teacher, "taylor", x0, default_example_inputs(teacher), 3, 0.05, 20)
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, 1000, (6,), generator=g)
    ref = _explicit_gradients(teacher, x0, t, torch.randn(x0.shape, generator=g))
    assert used == t.tolist() and set(grads) == set(ref)
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name], rtol=1e-4, atol=1e-6)


def test_diff_pruning_sums_gradients_over_timesteps_until_the_loss_falls_below_the_threshold():
    teacher, x0 = BUILDERS["unet2d"]().eval(), _calibration()
    inputs = default_example_inputs(teacher)
    grads, used = _denoising_gradients(teacher, "diff-pruning", x0, inputs, 0, 0.0, 2)
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
    _, used = _denoising_gradients(teacher, "diff-pruning", x0, inputs, 0, 0.99, 5)
    assert used == expected and len(used) < 5


@pytest.mark.parametrize("pruner", ["taylor", "diff-pruning", "TaylorPruner"])
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
