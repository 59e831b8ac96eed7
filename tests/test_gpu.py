"""The Jacobian estimators on a CUDA GPU, against float64 references (skipped without a GPU).

CPU float64 explicit Jacobians are the reference for the tiny diffusers models; for the full-size
DDPM-CIFAR10 layout, where d = 3072 makes explicit Jacobians too large, the reference is the float64
jvp/vjp on the GPU (which the first test ties to the explicit Jacobians).
"""

import pytest
import torch
from helpers.jacobians import reference_products, rel_error
from helpers.tiny_models import BUILDERS, example_inputs

from nni_2ndmatch import jacobian_sensitivity, sample_directions, second_match_loss
from nni_2ndmatch.method import DEFAULT_FD_STEP, fp32_precision, precision_state, squared_norm
from nni_2ndmatch.models import build_builtin

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _cuda(kw):
    return {k: v.cuda() for k, v in kw.items()}


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_estimators_on_the_gpu_match_explicit_cpu_jacobians(kind):
    model, (x, t, kw) = BUILDERS[kind]().double().eval(), example_inputs(kind)
    v = sample_directions(x)
    ref_jv, ref_jtv, _ = reference_products(model, x, t, v, **kw)
    model.cuda()
    got = {mode: jacobian_sensitivity(model, x.cuda(), t.cuda(), v.cuda(), mode=mode, **_cuda(kw)).cpu()
           for mode in ("jvp", "vjp", "fd")}
    assert rel_error(got["jvp"], ref_jv) < 1e-6
    assert rel_error(got["vjp"], ref_jtv) < 1e-6
    assert rel_error(got["fd"], ref_jv) < 1e-3  # float64 central difference: truncation error only


needs_tf32 = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                                reason="TF32 needs an Ampere or newer GPU")


@pytest.fixture
def tf32_allowed():
    """What many training scripts set: TF32 for matmuls too (cuDNN convolutions allow it by default)."""
    with fp32_precision("tf32"):
        yield precision_state()


def _ddpm(dtype, seed=0):
    return build_builtin("ddpm-cifar10", width=0.5, seed=seed).to(dtype).cuda()


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 32, 32, generator=g).cuda()
    return x, torch.tensor([10, 200, 500, 900]).cuda(), sample_directions(x)


@needs_tf32
def test_fp32_estimators_with_tf32_allowed_stay_accurate(tf32_allowed):
    model, model64 = _ddpm(torch.float32).eval(), _ddpm(torch.float64).eval()
    x, t, v = _inputs()
    exact = {mode: jacobian_sensitivity(model64, x.double(), t, v.double(), mode=mode) for mode in ("jvp", "vjp")}
    with torch.no_grad():
        fd = jacobian_sensitivity(model, x, t, v, mode="fd")
        h = DEFAULT_FD_STEP  # the same difference without the library's guard: TF32 ruins it
        unguarded = squared_norm((model(x + h * v, t).sample - model(x - h * v, t).sample) / (2 * h))
    assert precision_state() == tf32_allowed  # restored
    assert rel_error(fd.double(), exact["jvp"]) < 1e-3  # the bound tests/test_losses.py checks on the CPU
    assert rel_error(unguarded.double(), exact["jvp"]) > 1e-2
    for mode in ("jvp", "vjp"):  # these run in TF32 here (measured on an H200: below 1e-4)
        assert rel_error(jacobian_sensitivity(model, x, t, v, mode=mode).detach().double(), exact[mode]) < 1e-3


@needs_tf32
def test_fp32_finite_difference_gradient_with_tf32_allowed_matches_float64(tf32_allowed):
    """The backward through the perturbed evaluations must run in full fp32 too."""
    x, t, v = _inputs()
    grads = []
    for dtype in (torch.float64, torch.float32):
        student, teacher = _ddpm(dtype, seed=1), _ddpm(dtype, seed=2)
        second_match_loss(student, teacher, x.to(dtype), t, v=v.to(dtype), mode="fd").backward()
        grads.append(torch.cat([p.grad.flatten().double() for p in student.parameters() if p.grad is not None]))
        assert precision_state() == tf32_allowed
    scale = grads[0].abs().max()
    # full fp32 on the CPU: 4.8e-3 of the largest entry at width 0.25 (round-off of the difference)
    assert ((grads[1] - grads[0]).abs().max() / scale).item() < 2e-2


@pytest.mark.parametrize("mode", ["jvp", "vjp", "fd"])
def test_second_match_loss_gradient_on_the_gpu_matches_the_cpu(mode):
    student, teacher = BUILDERS["unet2d"](seed=1).double(), BUILDERS["unet2d"](seed=2).double()
    x, t, _ = example_inputs("unet2d")
    v = sample_directions(x)
    grads = []
    for device in ("cpu", "cuda"):
        student.to(device).zero_grad()
        loss = second_match_loss(student, teacher.to(device), x.to(device), t.to(device), v=v.to(device), mode=mode)
        loss.backward()
        # parameters the Jacobian does not depend on (the output bias) get no gradient from jvp/vjp
        grads.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().cpu()
                                for p in student.parameters()]))
    scale = grads[0].abs().max().item()
    assert scale > 0
    # diffusers computes the timestep embedding's sin/cos in float32, whose last bits differ between
    # CPU and CUDA: the float64 gradients differ by up to 3.5e-6 of the largest entry (measured on
    # an H200), far above float64 round-off; a wrong term would differ by O(1) of it
    assert torch.allclose(grads[1], grads[0], rtol=1e-4, atol=5e-5 * scale)


def test_a_finetune_on_the_gpu_with_ema_matches_the_cpus(tmp_path):
    """The student starts on the CPU and the runtime moves it: its EMA goes with it."""
    from helpers.tiny_models import tiny_unet2d
    from helpers.training import Images

    from nni_2ndmatch import TrainConfig, finetune, get_finetuner
    from nni_2ndmatch.training import Runtime, Watch

    config = TrainConfig(steps=3, batch_size=4, ema_decay=0.9, checkpoint_every=100, log_every=1, seed=1)
    results = {}
    for device in ("cpu", "cuda"):
        with fp32_precision("ieee"):
            results[device] = finetune(tiny_unet2d(seed=1, width=0.5), tiny_unet2d(seed=2), get_finetuner("kd"),
                                       Images(), config, runtime=Runtime(device), watch=Watch(progress=False)).student
    for p, q in zip(results["cpu"].parameters(), results["cuda"].parameters()):
        assert q.device.type == "cuda"
        torch.testing.assert_close(q.cpu(), p, rtol=1e-3, atol=1e-5)  # fp32 kernels of two devices
