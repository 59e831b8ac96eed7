"""The Jacobian estimators and the 2ndMatch loss against independent references (float64)."""

import contextlib
import functools

import pytest
import torch
from helpers.jacobians import explicit_jacobians, reference_products, rel_error
from helpers.nets import SymmetricNet, TinyNet
from helpers.tiny_models import BUILDERS, example_inputs

from nni_2ndmatch import jacobian_sensitivity, sample_directions, second_match_loss
from nni_2ndmatch.method import DEFAULT_FD_STEP, fp32_precision, precision_state
from nni_2ndmatch.method.precision import _restore_precision


@pytest.mark.parametrize("kind", ["tiny", *BUILDERS])
def test_per_sample_values_match_explicit_jacobian(kind):
    if kind == "tiny":
        model, (x, t, kw) = TinyNet().double(), (torch.randn(3, 1, 2, 3, dtype=torch.float64),
                                                torch.tensor([1.0, 50.0, 900.0], dtype=torch.float64), {})
    else:
        # eval: DiT drops labels at random in train mode
        model, (x, t, kw) = BUILDERS[kind]().double().eval(), example_inputs(kind)
    v = sample_directions(x)
    ref_jv, ref_jtv, _ = reference_products(model, x, t, v, **kw)
    assert rel_error(jacobian_sensitivity(model, x, t, v, mode="jvp", **kw), ref_jv) < 1e-6
    assert rel_error(jacobian_sensitivity(model, x, t, v, mode="vjp", **kw), ref_jtv) < 1e-6


def test_directions_are_unit_and_per_sample():
    v = sample_directions(torch.zeros(64, 3, 4, 4))
    assert torch.allclose(v.flatten(1).norm(dim=1), torch.ones(64))
    assert not torch.allclose(v[0], v[1])


def test_loss_mean_over_directions_matches_closed_form():
    """E_v[(v^T M v)^2] = (2||M||_F^2 + (tr M)^2) / (d (d + 2)), M = J_S^T J_S - J_T^T J_T."""
    student, teacher = TinyNet(seed=1).double(), TinyNet(seed=2).double()
    x0, t0 = torch.randn(1, 1, 2, 3, dtype=torch.float64), torch.tensor([10.0], dtype=torch.float64)
    n = 40000
    x, t = x0.expand(n, -1, -1, -1).contiguous(), t0.expand(n).contiguous()
    Js, Jt = explicit_jacobians(student, x0, t0)[0], explicit_jacobians(teacher, x0, t0)[0]
    M = Js.T @ Js - Jt.T @ Jt
    d = M.shape[0]
    expected = (2 * M.pow(2).sum() + M.trace() ** 2) / (d * (d + 2))
    with torch.no_grad():
        got = second_match_loss(student, teacher, x, t, mode="jvp")
    # Monte Carlo: the relative standard error of the mean over 40000 directions is about 1%.
    assert abs(got.item() - expected.item()) / expected.item() < 0.05


def test_jvp_and_vjp_agree_when_jacobian_is_symmetric_and_differ_when_not():
    x, t = torch.randn(4, 1, 2, 3, dtype=torch.float64), torch.full((4,), 3.0, dtype=torch.float64)
    v = sample_directions(x)
    sym = SymmetricNet().double()
    _, _, J = reference_products(sym, x, t, v)
    assert torch.allclose(J, J.transpose(1, 2), atol=1e-12)
    a, b = (jacobian_sensitivity(sym, x, t, v, mode=m) for m in ("jvp", "vjp"))
    assert rel_error(a, b) < 1e-10
    asym = TinyNet().double()
    a, b = (jacobian_sensitivity(asym, x, t, v, mode=m) for m in ("jvp", "vjp"))
    assert rel_error(a, b) > 1e-3


def test_finite_difference_error_is_second_order_and_small_in_fp32():
    model = BUILDERS["unet2d"]().double()
    x, t, _ = example_inputs("unet2d", batch=3)
    v = sample_directions(x)
    exact = jacobian_sensitivity(model, x, t, v, mode="jvp")
    errors = [rel_error(jacobian_sensitivity(model, x, t, v, mode="fd", fd_step=h), exact) for h in (0.2, 0.1)]
    # central difference: halving h divides the truncation error by about 4
    assert 3.0 < errors[0] / errors[1] < 5.0
    # the documented bound: below 1e-3 relative in fp32 at the default step
    model32, x32, v32 = model.float(), x.float(), v.float()
    fd32 = jacobian_sensitivity(model32, x32, t.float(), v32, mode="fd")
    assert DEFAULT_FD_STEP == 1e-2
    assert rel_error(fd32.double(), exact) < 1e-3


@pytest.mark.parametrize("mode", ["jvp", "vjp", "fd"])
def test_student_gradient_is_exact(mode):
    student, teacher = TinyNet(seed=1).double(), TinyNet(seed=2).double()
    x, t = torch.randn(3, 1, 2, 3, dtype=torch.float64), torch.tensor([5.0, 60.0, 700.0], dtype=torch.float64)
    v = sample_directions(x)
    names = [n for n, _ in student.named_parameters()]

    def loss_of(*params):
        def f(xx, tt):
            return torch.func.functional_call(student, dict(zip(names, params)), (xx, tt))
        return second_match_loss(f, teacher, x, t, v=v, mode=mode, fd_step=1e-3)

    params = tuple(p.detach().clone().requires_grad_(True) for p in student.parameters())
    assert torch.autograd.gradcheck(loss_of, params, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("mode", ["jvp", "vjp", "fd"])
def test_teacher_gets_no_gradient_and_is_untouched(mode):
    student, teacher = BUILDERS["unet2d"](seed=1), BUILDERS["unet2d"](seed=2)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    x, t, _ = example_inputs("unet2d", dtype=torch.float32)
    loss = second_match_loss(student, teacher, x, t, mode=mode)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.requires_grad for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def _hook_count(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_no_lasting_change_to_the_model_also_when_the_call_raises():
    model = BUILDERS["unet2d_condition"]()
    processors = dict(model.attn_processors)
    x, t, kw = example_inputs("unet2d_condition", dtype=torch.float32)
    jacobian_sensitivity(model, x, t, sample_directions(x), mode="jvp", **kw)
    assert _hook_count(model) == 0
    with pytest.raises(RuntimeError):
        # wrong conditioning width: the model raises inside the estimator
        jacobian_sensitivity(model, x, t, sample_directions(x), mode="vjp",
                             encoder_hidden_states=torch.randn(2, 3, 5))
    assert _hook_count(model) == 0
    assert all(model.attn_processors[k] is p for k, p in processors.items())
    # the fused attention kernels are usable again after the call (their own backward works)
    out = model(x.requires_grad_(), t, **kw).sample
    out.sum().backward()
    assert torch.is_grad_enabled()


def test_accepts_plain_callables_and_tuple_outputs():
    net = TinyNet().double()
    x, t = torch.randn(2, 1, 2, 3, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    v = sample_directions(x)
    a = jacobian_sensitivity(net, x, t, v)
    b = jacobian_sensitivity(lambda xx, tt: (net(xx, tt),), x, t, v)
    assert torch.equal(a, b)


def test_bad_mode_and_shapes_are_clear_errors():
    net = TinyNet()
    x, t = torch.randn(2, 1, 2, 3), torch.ones(2)
    with pytest.raises(ValueError, match="mode=.hvp.*allowed: vjp, jvp, fd"):
        jacobian_sensitivity(net, x, t, sample_directions(x), mode="hvp")
    with pytest.raises(ValueError, match="v has shape"):
        jacobian_sensitivity(net, x, t, torch.randn(2, 6))
    with pytest.raises(ValueError, match=r"fd_step=0.0 is not allowed; it must be in \(0, 1\)"):  # else NaN
        jacobian_sensitivity(net, x, t, sample_directions(x), mode="fd", fd_step=0.0)


@pytest.mark.parametrize("form, expected", [
    (dict(match="l2"), r"match='l2' is not allowed; allowed: norm, vector, log"),
    (dict(weighting="sigma"), r"weighting='sigma' is not allowed; allowed: none, noise, x0"),
    (dict(match="log", weighting="noise"), r"weighting='noise' is not allowed with match='log'"),
    (dict(reference_dims=0), r"reference_dims=0 is not allowed; it must be an integer >= 1, or None"),  # else / 0
    (dict(min_timestep=-1), r"min_timestep=-1 is not allowed"),
])
def test_a_term_form_the_term_cannot_take_is_refused_where_it_is_made(form, expected):
    from nni_2ndmatch import TermForm

    with pytest.raises(ValueError, match=expected):
        TermForm(**form)


def test_every_evaluation_of_one_estimate_uses_the_same_dropout_mask():
    net = TinyNet().double().train()
    net.drop.p = 0.5
    x, t = torch.randn(4, 1, 2, 3, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    v = sample_directions(x)
    torch.manual_seed(1)
    exact = jacobian_sensitivity(net, x, t, v, mode="jvp")
    torch.manual_seed(1)
    fd = jacobian_sensitivity(net, x, t, v, mode="fd", fd_step=1e-4)
    assert rel_error(fd, exact) < 1e-6


STARTING_PRECISIONS = {
    "default": lambda: None,
    "matmul high": lambda: torch.set_float32_matmul_precision("high"),
    "matmul medium": lambda: torch.set_float32_matmul_precision("medium"),  # oneDNN CPU matmuls in bf16
    "legacy flags": lambda: (setattr(torch.backends.cudnn, "allow_tf32", True),
                             setattr(torch.backends.cuda.matmul, "allow_tf32", True)),
    "new api": lambda: setattr(torch.backends, "fp32_precision", "tf32"),  # torch >= 2.9
}


@pytest.fixture(params=list(STARTING_PRECISIONS))
def user_precision(request):
    """The user's precision settings, undone after the test; yields their snapshot."""
    outer = precision_state()
    STARTING_PRECISIONS[request.param]()
    yield precision_state()
    _restore_precision(outer)


def _full_fp32_state():
    with fp32_precision("ieee"):
        return precision_state()


@pytest.mark.parametrize("raises", [False, True])
def test_finite_differences_and_their_backward_run_in_full_fp32(user_precision, raises):
    """TF32 (on by default for cuDNN convolutions) would round away the finite-difference step, in
    the forward and in the backward; the settings are global, so they are checked here on the CPU
    (tests/test_gpu.py measures the error on a GPU)."""
    full = _full_fp32_state()
    assert full[0] == (False, "highest")  # the legacy flags stay readable and agree
    assert all(value == "ieee" for value in full[1][1:])
    seen = {"forward": [], "backward": []}
    w = torch.nn.Parameter(torch.randn(1, 1, 2, 3))

    def net(x, t):
        seen["forward"].append(precision_state())
        if raises:
            raise RuntimeError("boom")
        y = torch.tanh(x * w)
        y.register_hook(lambda g: seen["backward"].append(precision_state()))
        return y

    x, t = torch.randn(2, 1, 2, 3), torch.ones(2)
    for mode in ("fd", "vjp"):
        expected = full if mode == "fd" else user_precision
        seen["forward"].clear(), seen["backward"].clear()
        with pytest.raises(RuntimeError, match="boom") if raises else contextlib.nullcontext():
            # two differences in one backward pass
            loss = sum(jacobian_sensitivity(net, x, t, sample_directions(x), mode=mode).sum() for _ in range(2))
        assert seen["forward"] and all(state == expected for state in seen["forward"])
        assert precision_state() == user_precision
        if raises:
            continue
        loss.backward()
        assert len(seen["backward"]) >= 2 and all(state == expected for state in seen["backward"])
        assert precision_state() == user_precision
    with pytest.raises(ValueError, match="precision='bf16' is not allowed; allowed: ieee, tf32"):
        with fp32_precision("bf16"):
            pass


@pytest.mark.parametrize("mode, student_math, teacher_math", [("vjp", True, False), ("jvp", True, True),
                                                               ("fd", False, False)])
def test_math_attention_only_where_a_second_derivative_or_forward_mode_needs_it(monkeypatch, mode, student_math,
                                                                                 teacher_math):
    """The fused attention kernels serve every evaluation that is differentiated at most once."""
    import torch.nn.attention as attention

    from nni_2ndmatch.method import student_and_teacher_sensitivity
    from nni_2ndmatch.method.jacobian import needs_math_attention

    assert needs_math_attention(mode, create_graph=True) is student_math
    assert needs_math_attention(mode, create_graph=False) is teacher_math
    entered = []
    real = attention.sdpa_kernel
    @functools.wraps(real)
    def recording(backends, *args, **kwargs):
        entered.append(tuple(backends))
        return real(backends, *args, **kwargs)

    monkeypatch.setattr(attention, "sdpa_kernel", recording)
    student, teacher = BUILDERS["unet2d"](seed=1), BUILDERS["unet2d"](seed=2)
    x, t = example_inputs("unet2d", dtype=torch.float32)[:2]
    v = sample_directions(x)
    eps_s, s_s, _, s_t = student_and_teacher_sensitivity(student, teacher, x, t, v, mode)
    assert len(entered) == student_math + teacher_math
    (s_s.sum() + eps_s.sum()).backward()  # the student's estimate trains with the kernels chosen
    assert all(p.grad is None for p in teacher.parameters())
