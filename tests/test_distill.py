"""2ndMatch and KD as NNI distillers: the loss NNI trains on, fusion with NNI pruners, physical students."""

import copy
import logging

import nni
import pytest
import torch
import torch.nn.functional as F
from helpers.tiny_models import tiny_unet2d
from nni.compression import TorchEvaluator
from nni.compression.pruning import L1NormPruner, TaylorPruner
from torch.utils.data import DataLoader

from nni_2ndmatch import (
    NoisyBatches,
    SecondMatchDistiller,
    diffusion_evaluator,
    get_finetuner,
    masks_to_student,
)
from nni_2ndmatch.method import (
    jacobian_sensitivity,
    model_output,
    sample_directions,
    squared_norm,
)
from nni_2ndmatch.nni import dsm_training_step
from nni_2ndmatch.pruning import default_example_inputs

PRUNE_CONFIG = [{"op_types": ["Conv2d", "Linear"], "sparse_ratio": 0.5, "exclude_op_names": ["conv_out"]}]


def _loader(n=8, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = [torch.randn(1, 8, 8, generator=g) for _ in range(n)]
    return DataLoader(data, batch_size=batch, collate_fn=NoisyBatches(seed=seed))


def _recording_evaluator(model, loader, lr=0.0):
    """A TorchEvaluator whose loop records, per step, the batch, the torch RNG state before the loss
    and the loss NNI trained on; lr=0 keeps the weights, so each step can be recomputed."""
    records = []

    def training_func(model, optimizers, training_step, lr_schedulers=None, max_steps=None, max_epochs=None):
        for batch in loader:
            state = torch.get_rng_state()
            loss = training_step(batch, model)
            records.append((batch, state, loss.item()))
            optimizers.zero_grad()
            loss.backward()
            optimizers.step()
            if max_steps is not None and len(records) >= max_steps:
                return

    optimizer = nni.trace(torch.optim.SGD)(model.parameters(), lr=lr)
    return TorchEvaluator(training_func, optimizer, dsm_training_step), records


def _reference_loss(student, teacher, batch, rng_state, lambda_kd, lambda_jac):
    """The same step, independently: DSM + KD + Jacobian term (jvp: ||J v||^2, as asked of the distiller)."""
    x_t, t, noise = batch["x_t"], batch["timesteps"], batch["noise"]
    with torch.no_grad():
        eps_s, eps_t = model_output(student, x_t, t), model_output(teacher, x_t, t)
    torch.set_rng_state(rng_state)
    v = sample_directions(x_t)  # the distiller draws its directions the same way
    s_s = jacobian_sensitivity(student, x_t, t, v, mode="jvp")
    s_t = jacobian_sensitivity(teacher, x_t, t, v, mode="jvp")
    return (squared_norm(eps_s - noise).mean() + lambda_kd * squared_norm(eps_s - eps_t).mean()
            + lambda_jac * (s_s - s_t).pow(2).mean()).item()


def test_the_loss_nni_trains_on_is_dsm_plus_kd_plus_the_jacobian_term():
    teacher, student = tiny_unet2d(0), tiny_unet2d(1)
    evaluator, records = _recording_evaluator(student, _loader())
    distiller = SecondMatchDistiller(student, [], evaluator, teacher_model=teacher, lambda_kd=0.5, lambda_jac=3.0,
                                     mode="jvp")
    distiller.compress(max_steps=2, max_epochs=None)
    assert len(records) == 2
    for batch, state, loss in records:
        ref = _reference_loss(student, teacher, batch, state, 0.5, 3.0)
        assert loss == pytest.approx(ref, rel=1e-5)
    assert set(distiller.last_terms) == {"dsm", "kd", "jac", "loss"}
    assert distiller.last_terms["jac"] > 0


def test_jac_every_counts_the_distillers_steps(caplog):
    teacher, student = tiny_unet2d(0), tiny_unet2d(1)
    evaluator, records = _recording_evaluator(student, _loader(n=16))
    distiller = SecondMatchDistiller(student, [], evaluator, teacher_model=teacher, lambda_kd=0.5, lambda_jac=3.0,
                                     mode="jvp", jac_every=2)
    distiller.compress(max_steps=4, max_epochs=None)
    assert len(records) == 4 and "jac" in distiller.last_terms
    for step, (batch, state, loss) in enumerate(records):  # steps 2 and 4 weigh the term twice, 1 and 3 not at all
        ref = _reference_loss(student, teacher, batch, state, 0.5, 6.0 if step % 2 else 0.0)
        assert loss == pytest.approx(ref, rel=1e-5)
    # a call of fewer steps than jac_every would never compute the term: refused before training;
    # a run that epochs limit, ended without it, says so
    distiller.unwrap_model()
    evaluator, records = _recording_evaluator(student, _loader(n=8))
    distiller = SecondMatchDistiller(student, [], evaluator, teacher_model=teacher, jac_every=3)
    with pytest.raises(ValueError, match=r"jac_every=3 is not allowed with compress\(max_steps=2\): no step would "
                                         "compute the Jacobian term; allowed: 1 to 2"):
        distiller.compress(max_steps=2, max_epochs=None)
    assert records == []
    with caplog.at_level(logging.WARNING, logger="nni_2ndmatch.nni.distiller"):
        distiller.compress(max_steps=None, max_epochs=1)  # one epoch: 8 images in batches of 4
    assert len(records) == 2 and "jac" not in distiller.last_terms
    assert "jac_every=3: none of this compress()'s 2 steps computed the Jacobian term" in caplog.text
    distiller.compress(max_steps=1, max_epochs=None)  # the third step computes it
    assert "jac" in distiller.last_terms
    with pytest.raises(ValueError, match=r"compress\(max_steps=2\): no step .*; its term steps are multiples "
                                         "of 3, this call's are 4 to 5"):
        distiller.compress(max_steps=2, max_epochs=None)


def test_layerwise_targets_of_the_config_list_add_to_the_strategy_terms():
    teacher, student = tiny_unet2d(0), tiny_unet2d(1)
    evaluator, records = _recording_evaluator(student, _loader(n=4))
    config = [{"op_names": ["conv_in"], "target_names": ["_output_"], "lambda": 2.0}]
    distiller = SecondMatchDistiller(student, config, evaluator, teacher_model=teacher, finetuner="kd", lambda_kd=1.0)
    distiller.compress(max_steps=1, max_epochs=None)
    distiller.unwrap_model()
    distiller.unwrap_teacher_model()
    (batch, _, loss), = records
    x_t, t = batch["x_t"], batch["timesteps"]
    with torch.no_grad():
        eps_s, eps_t = model_output(student, x_t, t), model_output(teacher, x_t, t)
        emb_s, emb_t = student.conv_in(x_t), teacher.conv_in(x_t)
    ref = (squared_norm(eps_s - batch["noise"]).mean() + squared_norm(eps_s - eps_t).mean()
           + 2.0 * F.mse_loss(emb_s, emb_t)).item()
    assert F.mse_loss(emb_s, emb_t).item() > 1e-3  # the layer-wise term is not negligible
    assert loss == pytest.approx(ref, rel=1e-5)
    assert "jac" not in distiller.last_terms


def test_training_moves_the_student_and_never_the_teacher():
    teacher, student = tiny_unet2d(0), tiny_unet2d(1)
    before_t = copy.deepcopy(teacher.state_dict())
    before_s = copy.deepcopy(student.state_dict())
    distiller = SecondMatchDistiller(student, [], diffusion_evaluator(student, _loader(), lr=1e-3),
                                     teacher_model=teacher)
    distiller.compress(max_steps=2, max_epochs=None)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before_t.items())
    assert all(p.grad is None for p in teacher.parameters())
    assert any(not torch.equal(v, student.state_dict()[k]) for k, v in before_s.items())


def _fused_then_physical(pruner, teacher, student, evaluator=None):
    distiller = SecondMatchDistiller.from_compressor(pruner, [], teacher_model=teacher, evaluator=evaluator,
                                                     lambda_jac=0.1)
    distiller.compress(max_steps=3, max_epochs=None)
    masks = pruner.get_masks()
    distiller.unwrap_model()
    physical, report = masks_to_student(student, masks, round_to=None)
    return distiller, masks, physical, report


def test_fused_with_l1norm_pruner_gives_a_physical_student():
    teacher, student = tiny_unet2d(0), tiny_unet2d(0)
    pruner = L1NormPruner(student, PRUNE_CONFIG)
    pruner.compress()  # L1NormPruner does not recompute masks in a fused run
    distiller, masks, physical, report = _fused_then_physical(pruner, teacher, student,
                                                              diffusion_evaluator(student, _loader(), lr=1e-3))
    assert masks["down_blocks.0.resnets.0.conv1"]["weight"].flatten(1).abs().sum(1).eq(0).any()
    assert report["macs_ratio"] < 0.6
    assert distiller.last_terms["jac"] > 0
    x = default_example_inputs(physical)
    assert physical(**x).sample.shape == x["sample"].shape


def test_fused_with_taylor_pruner_masks_come_from_the_fused_run():
    teacher, student = tiny_unet2d(0), tiny_unet2d(0)
    pruner = TaylorPruner(student, PRUNE_CONFIG, diffusion_evaluator(student, _loader(), lr=1e-3), training_steps=2)
    _, masks, physical, report = _fused_then_physical(pruner, teacher, student)
    assert masks["down_blocks.0.resnets.0.conv1"]["weight"].flatten(1).abs().sum(1).eq(0).any()
    assert report["macs_ratio"] < 0.6
    assert physical.conv_out.out_channels == 1


def test_distills_a_physically_pruned_student_with_an_output_layer_target():
    teacher = tiny_unet2d(0)
    physical, _ = masks_to_student(teacher, {name: {"weight": _half_rows(m.weight)} for name, m in
                                             teacher.named_modules() if name == "conv_in"}, round_to=None)
    assert physical.conv_in.out_channels < teacher.conv_in.out_channels
    evaluator, records = _recording_evaluator(physical, _loader(n=4), lr=1e-3)
    config = [{"op_names": ["conv_out"], "target_names": ["_output_"], "lambda": 1.0}]
    distiller = SecondMatchDistiller(physical, config, evaluator, teacher_model=teacher)
    distiller.compress(max_steps=1, max_epochs=None)
    assert len(records) == 1 and torch.isfinite(torch.tensor(records[0][2]))
    assert distiller.last_terms["jac"] > 0


def _half_rows(weight):
    mask = torch.ones_like(weight)
    mask[: weight.shape[0] // 2] = 0
    return mask


def test_the_distillers_strategy_reads_the_schedule_its_batches_were_noised_by():
    from diffusers import DDPMScheduler

    teacher, student = tiny_unet2d(0), tiny_unet2d(1)
    sd = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([100, 500, 900])
    scales = {}
    for name, scheduler in (("reference", None), ("sd", sd)):
        distiller = SecondMatchDistiller(student, [], diffusion_evaluator(student, _loader()), teacher_model=teacher,
                                         jac_weighting="x0", scheduler=scheduler)
        scales[name] = distiller.strategy.jacobian_scale(t)
        distiller.unwrap_model()
    abar = sd.alphas_cumprod.double()[t]
    torch.testing.assert_close(scales["sd"], ((1 - abar) / abar).sqrt())  # c(t) of x0 weighting, SD's schedule
    assert not torch.allclose(scales["sd"], scales["reference"])


def test_the_distillers_batches_refuse_a_schedule_that_does_not_predict_the_noise():
    from diffusers import DDPMScheduler

    NoisyBatches(DDPMScheduler(prediction_type="epsilon"))
    with pytest.raises(ValueError, match="noised batches .* need a noise-predicting network .*; the scheduler's "
                                         "prediction_type is 'v_prediction'; allowed: 'epsilon'"):
        NoisyBatches(DDPMScheduler(prediction_type="v_prediction"))
    with pytest.raises(ValueError, match="scheduler='ddpm' is not a diffusers noise scheduler"):
        NoisyBatches("ddpm")
    with pytest.raises(ValueError, match="scheduler='ddpm' is not a diffusers noise scheduler"):
        get_finetuner("kd", scheduler="ddpm")


@pytest.mark.parametrize("scheduler", ["v_prediction", "flow"])
def test_the_distiller_refuses_a_schedule_its_batches_cannot_have(scheduler):
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    scheduler = DDPMScheduler(prediction_type="v_prediction") if scheduler == "v_prediction" else \
        FlowMatchEulerDiscreteScheduler(shift=3.0)
    student, teacher = tiny_unet2d(1), tiny_unet2d(0)
    evaluator = diffusion_evaluator(student, _loader(n=8, batch=4), progress=False)
    with pytest.raises(ValueError, match=r"the distiller trains on NoisyBatches' batches, which need a "
                                         r"noise-predicting network .*; the scheduler's prediction_type is"):
        SecondMatchDistiller(student, [], evaluator, teacher_model=teacher, scheduler=scheduler)


def test_the_distiller_refuses_a_missing_teacher_and_a_bad_dsm_weight():
    student, teacher = tiny_unet2d(1), tiny_unet2d(0)
    evaluator = diffusion_evaluator(student, _loader(n=8, batch=4), progress=False)
    with pytest.raises(ValueError, match="teacher_model=NoneType: the distiller needs the dense teacher"):
        SecondMatchDistiller(student, [], evaluator, teacher_model=None)
    for bad in ("a", -1.0, True):
        with pytest.raises(ValueError, match=f"origin_loss_lambda={bad!r} is not allowed"):
            SecondMatchDistiller(student, [], evaluator, teacher_model=teacher, origin_loss_lambda=bad)


@pytest.mark.parametrize("item, expected", [
    ((torch.zeros(1, 8, 8), 3), r"a data item is a tuple \(such as a torchvision dataset's \(image, label\)\)"),
    ({"image": torch.zeros(1, 8, 8)}, r"a data item is a dict without 'sample'"),
    (torch.zeros(1, 8, 8, dtype=torch.uint8), r"a data item is a uint8 tensor; allowed: a float image tensor"),
])
def test_noisy_batches_name_a_data_item_they_cannot_stack(item, expected):
    with pytest.raises(ValueError, match=expected):
        NoisyBatches()([item, item])


def test_the_evaluators_loop_stops_at_whichever_limit_comes_first():
    teacher, student = tiny_unet2d(0).train(), tiny_unet2d(1)
    distiller = SecondMatchDistiller(student, [], diffusion_evaluator(student, _loader(n=8, batch=4),
                                                                     progress=False), teacher_model=teacher)
    distiller.compress(max_steps=10, max_epochs=1)  # one epoch is 2 batches
    assert distiller.steps == 2 and not teacher.training
    distiller.unwrap_model()
    empty = DataLoader([], batch_size=4, collate_fn=NoisyBatches())
    distiller = SecondMatchDistiller(student, [], diffusion_evaluator(student, empty, progress=False),
                                     teacher_model=teacher)
    with pytest.raises(ValueError, match="the evaluator's dataloader gave no batch"):
        distiller.compress(max_steps=3, max_epochs=None)
    distiller.unwrap_model()


def test_strategy_errors_are_clear():
    teacher, student = tiny_unet2d(0), tiny_unet2d(1)
    evaluator = diffusion_evaluator(student, _loader())
    with pytest.raises(ValueError, match="finetuner='dsm' uses no teacher"):
        SecondMatchDistiller(student, [], evaluator, teacher_model=teacher, finetuner="dsm")
    with pytest.raises(ValueError, match="lambda_dsm is not an option of the distiller"):
        SecondMatchDistiller(student, [], evaluator, teacher_model=teacher, lambda_dsm=1.0)
    with pytest.raises(ValueError, match="has no option 'lamda_jac'.*did you mean 'lambda_jac'") as caught:
        SecondMatchDistiller(student, [], evaluator, teacher_model=teacher, lamda_jac=1.0)
    assert "lambda_dsm" not in str(caught.value)  # what the distiller refuses is not offered
    with pytest.raises(ValueError, match=r"finetuner 'kd' has no option 'lamda_kd'.*allowed: lambda_kd, kd_perturb\)"):
        SecondMatchDistiller(student, [], evaluator, teacher_model=teacher, finetuner="kd", lamda_kd=1.0)
    with pytest.raises(ValueError, match=r"jac_every=0 is not allowed: .*greater than or equal to 1"):
        SecondMatchDistiller(student, [], evaluator, teacher_model=teacher, jac_every=0)
    with pytest.raises(KeyError, match="the batch has no x_t, timesteps, noise"):
        dsm_training_step({"sample": torch.zeros(1, 1, 8, 8)}, student)
