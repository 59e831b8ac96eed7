"""The strategy registry and each strategy's loss, checked against direct computations."""

import pytest
import torch
from helpers.nets import TinyNet
from helpers.tiny_models import BUILDERS, example_inputs

import nni_2ndmatch.finetuners as F
from nni_2ndmatch import (
    Finetuner,
    TermForm,
    available_finetuners,
    get_finetuner,
    register_finetuner,
    sample_directions,
    second_match_loss,
)


def test_builtin_names_and_unknown_name_lists_them():
    assert {"dsm", "kd", "2ndmatch"} <= set(available_finetuners())
    with pytest.raises(ValueError, match=r"finetuner='2ndmach' is unknown; available: 2ndmatch, dsm, kd"):
        get_finetuner("2ndmach")


def test_unknown_option_suggests_the_nearest_and_bad_values_name_the_field():
    with pytest.raises(ValueError, match="no option 'lamda_jac'.*did you mean 'lambda_jac'"):
        get_finetuner("2ndmatch", lamda_jac=0.1)
    with pytest.raises(ValueError, match=r"lambda_kd=-1 is not allowed"):
        get_finetuner("kd", lambda_kd=-1)
    with pytest.raises(ValueError, match=r"mode='hessian' is not allowed: Input should be 'auto', 'vjp', 'jvp' or"):
        get_finetuner("2ndmatch", mode="hessian")
    with pytest.raises(ValueError, match=r"jac_fraction=0 is not allowed"):
        get_finetuner("2ndmatch", jac_fraction=0)
    with pytest.raises(ValueError, match=r"num_projections=0 is not allowed"):
        get_finetuner("2ndmatch", num_projections=0)


def test_reference_defaults_and_options_round_trip():
    ft = get_finetuner("2ndmatch")
    assert (ft.lambda_dsm, ft.lambda_kd, ft.lambda_jac, ft.mode) == (1.0, 1.0, 0.1, "auto")
    again = get_finetuner("2ndmatch", **ft.options())
    assert again.options() == ft.options()
    assert ft.num_train_timesteps == 1000
    for name in available_finetuners():  # every strategy's options round-trip through JSON
        import json

        options = get_finetuner(name).options()
        assert get_finetuner(name, **json.loads(json.dumps(options))).options() == options


def test_options_are_strictly_typed():
    for bad in ({"lambda_jac": True}, {"lambda_jac": "0.1"}, {"num_projections": 2.0}, {"lambda_kd": float("inf")},
                {"jac_reference_dims": True}):
        key = next(iter(bad))
        with pytest.raises(ValueError, match=f"{key}=.* is not allowed"):
            get_finetuner("2ndmatch", **bad)


def test_duplicate_registration_is_an_error_and_entry_points_are_loaded(monkeypatch):
    with pytest.raises(ValueError, match="already registered"):
        @register_finetuner("dsm")
        class Other(Finetuner):
            pass

    class Plugin(Finetuner):
        uses_teacher = False

        def __init__(self, *, lambda_dsm=1.0, scheduler=None):
            super().__init__(lambda_dsm=lambda_dsm, scheduler=scheduler)

        def terms(self, student, teacher, x_t, noise, timesteps, **kw):
            return {"dsm": (student(x_t, timesteps) - noise).abs().sum(dim=(1, 2, 3)).mean()}

    class EntryPoint:
        name = "l1"

        def load(self):
            return Plugin

    monkeypatch.setattr(F, "_entry_points_loaded", False)
    monkeypatch.setattr(F, "entry_points", lambda group: [EntryPoint()] if group == F.ENTRY_POINT_GROUP else [])
    monkeypatch.setattr(F, "_REGISTRY", dict(F._REGISTRY))
    assert "l1" in available_finetuners()
    loss, terms = get_finetuner("l1").loss(TinyNet(), None, torch.randn(2, 1, 2, 3), torch.randn(2, 1, 2, 3),
                                           torch.tensor([1, 2]))
    assert loss.item() == pytest.approx(terms["dsm"])


def _inputs(batch=4):
    x0, noise = torch.randn(batch, 1, 2, 3), torch.randn(batch, 1, 2, 3)
    return x0, noise, torch.randint(0, 1000, (batch,))


def test_dsm_and_kd_match_direct_computation():
    student, teacher = TinyNet(seed=1), TinyNet(seed=2)
    x0, noise, t = _inputs()
    ft = get_finetuner("kd", lambda_kd=0.5)
    loss, terms = ft.loss(student, teacher, x0, noise, t)
    x_t = ft.scheduler.add_noise(x0, noise, t)
    abar = ft.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(x_t, abar.sqrt() * x0 + (1 - abar).sqrt() * noise, atol=1e-6)
    dsm = (student(x_t, t) - noise).pow(2).sum(dim=(1, 2, 3)).mean()
    kd = (student(x_t, t) - teacher(x_t, t)).pow(2).sum(dim=(1, 2, 3)).mean()
    assert terms["dsm"] == pytest.approx(dsm.item(), rel=1e-6)
    assert terms["kd"] == pytest.approx(kd.item(), rel=1e-6)
    assert loss.item() == pytest.approx(dsm.item() + 0.5 * kd.item(), rel=1e-6)
    dsm_only, dsm_terms = get_finetuner("dsm").loss(student, None, x0, noise, t)
    assert set(dsm_terms) == {"dsm", "loss"} and dsm_only.item() == pytest.approx(dsm.item(), rel=1e-6)


@pytest.mark.parametrize("mode", ["jvp", "vjp", "fd"])
def test_2ndmatch_total_is_the_weighted_sum_with_the_same_directions(mode):
    student, teacher = TinyNet(seed=1).double(), TinyNet(seed=2).double()
    x0, noise, t = (a.double() if a.is_floating_point() else a for a in _inputs())
    ft = get_finetuner("2ndmatch", lambda_jac=0.3, mode=mode)
    torch.manual_seed(7)
    loss, terms = ft.loss(student, teacher, x0, noise, t)
    torch.manual_seed(7)
    x_t = ft.add_noise(x0, noise, t)
    v = sample_directions(x_t)
    jac = second_match_loss(student, teacher, x_t, t, v=v, mode=mode)
    assert terms["jac"] == pytest.approx(jac.item(), rel=1e-9)
    assert loss.item() == pytest.approx(terms["dsm"] + terms["kd"] + 0.3 * terms["jac"], rel=1e-9)
    # the Jacobian evaluations' outputs serve DSM and KD: same values as the plain strategy
    _, kd_terms = get_finetuner("kd").loss(student, teacher, x0, noise, t)
    assert terms["dsm"] == pytest.approx(kd_terms["dsm"], rel=1e-9)
    assert terms["kd"] == pytest.approx(kd_terms["kd"], rel=1e-9)


def test_noise_weighting_scales_both_sensitivities_by_one_minus_alpha_bar():
    from nni_2ndmatch.method import jacobian_sensitivity

    student, teacher = TinyNet(seed=1).double(), TinyNet(seed=2).double()
    x0, noise, _ = (a.double() if a.is_floating_point() else a for a in _inputs())
    t = torch.tensor([0, 10, 500, 999])
    ft = get_finetuner("2ndmatch", mode="jvp", jac_weighting="noise")
    torch.manual_seed(3)
    _, terms = ft.loss(student, teacher, x0, noise, t)
    torch.manual_seed(3)
    x_t = ft.add_noise(x0, noise, t)
    v = sample_directions(x_t)
    w = 1 - ft.scheduler.alphas_cumprod[t].double()
    s_s, s_t = (jacobian_sensitivity(m, x_t, t, v, mode="jvp") for m in (student, teacher))
    diff = w * (s_s - s_t)
    assert terms["jac"] == pytest.approx(diff.pow(2).mean().item(), rel=1e-9)
    _, plain = get_finetuner("2ndmatch", mode="jvp").loss(student, teacher, x0, noise, t)
    assert terms["jac"] < plain["jac"]  # 1 - abar < 1 everywhere
    with pytest.raises(ValueError, match="jac_weighting='snr' is not allowed: Input should be 'none', 'noise' or 'x0'"):
        get_finetuner("2ndmatch", jac_weighting="snr")


def test_jacobian_on_a_fraction_of_the_batch_and_several_projections():
    student, teacher = TinyNet(seed=1).double(), TinyNet(seed=2).double()
    x0, noise, t = (a.double() if a.is_floating_point() else a for a in _inputs(batch=8))
    ft = get_finetuner("2ndmatch", mode="jvp", jac_fraction=0.25, num_projections=3)
    torch.manual_seed(3)
    _, terms = ft.loss(student, teacher, x0, noise, t)
    torch.manual_seed(3)
    x_t = ft.add_noise(x0, noise, t)
    x_j, t_j = x_t[:2].repeat(3, 1, 1, 1), t[:2].repeat(3)
    jac = second_match_loss(student, teacher, x_j, t_j, v=sample_directions(x_j), mode="jvp")
    assert terms["jac"] == pytest.approx(jac.item(), rel=1e-9)
    _, kd_terms = get_finetuner("kd").loss(student, teacher, x0, noise, t)
    assert terms["dsm"] == pytest.approx(kd_terms["dsm"], rel=1e-9)


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_2ndmatch_on_each_diffusers_family_with_conditioning(kind):
    student, teacher = BUILDERS[kind](seed=1), BUILDERS[kind](seed=2)
    x0, t, kw = example_inputs(kind, batch=3, dtype=torch.float32)
    ft = get_finetuner("2ndmatch", jac_fraction=0.5)  # conditioning is split with the batch
    loss, terms = ft.loss(student, teacher, x0, torch.randn_like(x0), t.long(), **kw)
    loss.backward()
    assert all(torch.isfinite(torch.tensor(v)) for v in terms.values()) and terms["jac"] > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_a_scheduler_that_predicts_neither_noise_nor_velocity_is_refused():
    from diffusers import DDPMScheduler

    with pytest.raises(ValueError, match="prediction_type='sample' is not supported; allowed: 'epsilon', "):
        get_finetuner("dsm", scheduler=DDPMScheduler(prediction_type="sample"))


def test_jac_reference_dims_scales_the_term_by_image_size_over_the_reference():
    student, teacher = TinyNet(seed=1).double(), TinyNet(seed=2).double()
    x0, noise, t = (a.double() if a.is_floating_point() else a for a in _inputs())
    d = x0[0].numel()
    torch.manual_seed(5)
    _, plain = get_finetuner("2ndmatch", mode="vjp").loss(student, teacher, x0, noise, t)
    torch.manual_seed(5)
    loss, scaled = get_finetuner("2ndmatch", mode="vjp", lambda_jac=0.1, jac_reference_dims=3072).loss(
        student, teacher, x0, noise, t)
    assert scaled["jac"] == pytest.approx(plain["jac"] * d / 3072, rel=1e-9)
    assert loss.item() == pytest.approx(scaled["dsm"] + scaled["kd"] + 0.1 * scaled["jac"], rel=1e-9)
    for bad in (0, -3, 2.5, True, "3072"):
        with pytest.raises(ValueError, match=f"jac_reference_dims={bad!r} is not allowed"):
            get_finetuner("2ndmatch", jac_reference_dims=bad)


def _explicit_match(student, teacher, x_t, t, v, mode, match, scale):
    """The Jacobian term from explicit float64 Jacobians: products u = J v (jvp) or J^T v (vjp)."""
    from helpers.jacobians import explicit_jacobians

    vf = v.flatten(1)
    u = {}
    for role, model in (("s", student), ("t", teacher)):
        J = explicit_jacobians(model, x_t, t)
        u[role] = scale[:, None] * (torch.einsum("bij,bj->bi", J, vf) if mode == "jvp"
                                    else torch.einsum("bji,bj->bi", J, vf))
    s_s, s_t = u["s"].pow(2).sum(1), u["t"].pow(2).sum(1)
    return {"norm": (s_s - s_t).pow(2), "vector": (u["s"] - u["t"]).pow(2).sum(1),
            "log": (s_s.log() - s_t.log()).pow(2)}[match]


@pytest.mark.parametrize("mode", ["jvp", "vjp"])
@pytest.mark.parametrize("match,weighting,floor", [("vector", "none", 0), ("log", "none", 0), ("norm", "x0", 0),
                                                   ("vector", "x0", 0), ("norm", "none", 400),
                                                   ("vector", "noise", 400)])
def test_jac_match_weighting_and_floor_match_explicit_jacobians(mode, match, weighting, floor):
    student, teacher = TinyNet(seed=1).double(), TinyNet(seed=2).double()
    x0, noise, _ = (a.double() if a.is_floating_point() else a for a in _inputs())
    t = torch.tensor([0, 10, 500, 999])
    ft = get_finetuner("2ndmatch", mode=mode, jac_match=match, jac_weighting=weighting, jac_min_timestep=floor)
    torch.manual_seed(3)
    _, terms = ft.loss(student, teacher, x0, noise, t)
    torch.manual_seed(3)
    x_t = ft.add_noise(x0, noise, t)
    v = sample_directions(x_t)
    abar = ft.scheduler.alphas_cumprod.double()[t]
    scale = {"none": torch.ones(4, dtype=torch.float64), "noise": (1 - abar).sqrt(),
             "x0": ((1 - abar) / abar).sqrt()}[weighting]
    per_sample = _explicit_match(student, teacher, x_t, t.double(), v, mode, match, scale) * (t >= floor)
    assert terms["jac"] == pytest.approx(per_sample.mean().item(), rel=1e-9)
    # the functional API writes every form of the term the strategy does
    form = TermForm(match=match, weighting=weighting, min_timestep=floor, reference_dims=3)
    functional = second_match_loss(student, teacher, x_t, t, v=v, mode=mode, form=form, scheduler=ft.scheduler)
    assert functional.item() == pytest.approx(per_sample.mean().item() * 6 / 3, rel=1e-9)
    assert (per_sample > 0).sum() == (4 if floor == 0 else 2)


@pytest.mark.parametrize("match", ["vector", "log"])
def test_jac_match_student_gradient_is_exact(match):
    student, teacher = TinyNet(seed=1).double(), TinyNet(seed=2).double()
    x0, noise, _ = (a.double() if a.is_floating_point() else a for a in _inputs(batch=3))
    t = torch.tensor([5, 60, 700])
    ft = get_finetuner("2ndmatch", mode="vjp", jac_match=match, lambda_dsm=0.0, lambda_kd=0.0)
    names = [n for n, _ in student.named_parameters()]

    def loss_of(*params):
        def f(xx, tt):
            return torch.func.functional_call(student, dict(zip(names, params)), (xx, tt))
        torch.manual_seed(11)  # the same directions in every evaluation
        return ft.loss(f, teacher, x0, noise, t)[0]

    params = tuple(p.detach().clone().requires_grad_(True) for p in student.parameters())
    assert torch.autograd.gradcheck(loss_of, params, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_x0_weighting_under_v_prediction_is_the_noise_scale_and_log_refuses_a_weighting():
    from diffusers import DDPMScheduler

    t = torch.tensor([0, 300, 999])
    v_pred = get_finetuner("2ndmatch", jac_weighting="x0", scheduler=DDPMScheduler(prediction_type="v_prediction"))
    noise = get_finetuner("2ndmatch", jac_weighting="noise")
    assert torch.equal(v_pred.jacobian_scale(t), noise.jacobian_scale(t))
    eps = get_finetuner("2ndmatch", jac_weighting="x0")
    abar = eps.scheduler.alphas_cumprod.double()[t]
    assert torch.allclose(eps.jacobian_scale(t), ((1 - abar) / abar).sqrt())
    with pytest.raises(ValueError, match="jac_weighting='x0' is not allowed with jac_match='log'"):
        get_finetuner("2ndmatch", jac_match="log", jac_weighting="x0")
    with pytest.raises(ValueError, match="jac_match='frobenius' is not allowed: Input should be 'norm', 'vector' or"):
        get_finetuner("2ndmatch", jac_match="frobenius")
    with pytest.raises(ValueError, match="jac_min_timestep=-1 is not allowed"):
        get_finetuner("2ndmatch", jac_min_timestep=-1)


def test_forward_profile_counts_multiply_adds_and_attention_scores_by_hand():
    from diffusers.models.attention_processor import Attention

    from nni_2ndmatch.models.profile import forward_profile

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1, groups=1)
            self.attn = Attention(query_dim=8, heads=2, dim_head=4)  # inner dim 8

        def forward(self, x, t):
            h = self.conv(x)  # [B, 8, 4, 4]
            return self.attn(h.flatten(2).transpose(1, 2))  # 16 tokens of width 8

    profile = forward_profile(Block(), torch.randn(3, 3, 4, 4), torch.zeros(3))
    conv = 8 * 4 * 4 * (3 * 3 * 3)
    projections = 4 * 16 * 8 * 8  # q, k, v, out
    products = 2 * 16 * 16 * 8  # QK^T and AV
    assert profile.macs == conv + projections + products
    assert profile.attention_scores == 2 * 16 * 16


def test_mode_auto_is_fd_where_attention_dominates_and_fd_is_accurate_else_vjp(monkeypatch):
    import nni_2ndmatch.finetuners as F
    from nni_2ndmatch import build_builtin

    conv, attention = build_builtin("tiny-unet").eval(), build_builtin("tiny-unet-cond").eval()
    mode, why = F.choose_mode(conv, (conv.config.in_channels, 16, 16))
    assert mode == "vjp" and "below 0.002" in why
    ft = get_finetuner("2ndmatch")
    ft.resolve(attention, (attention.config.in_channels, 16, 16))
    assert ft.mode == "fd" and ft.options()["mode"] == "fd"
    again = get_finetuner("2ndmatch", **ft.options())  # what config.yaml and checkpoints record
    assert again.mode == "fd"
    monkeypatch.setattr(F, "FD_MAX_ERROR", 1e-12)
    mode, why = F.choose_mode(attention, (attention.config.in_channels, 16, 16))
    assert mode == "vjp" and "fd's error" in why
    explicit = get_finetuner("2ndmatch", mode="jvp")
    explicit.resolve(attention, (attention.config.in_channels, 16, 16))
    assert explicit.mode == "jvp"


def _double_inputs(batch=4):
    x0, noise, t = _inputs(batch)
    return x0.double(), noise.double(), t


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_jac_every_puts_k_times_the_term_on_every_kth_step_and_kd_between():
    student, teacher = TinyNet(seed=1).double(), TinyNet(seed=2).double()
    x0, noise, t = _double_inputs()
    every = get_finetuner("2ndmatch", lambda_jac=0.3, jac_every=3, mode="vjp")
    reference, k_times = (get_finetuner("2ndmatch", lambda_jac=lam, mode="vjp") for lam in (0.3, 0.9))
    contributions, every_step = [], []
    for step in range(6):
        every.step = step
        student.zero_grad()
        torch.manual_seed(5)  # the same directions at every step: the every-step term is one number
        loss, terms = every.loss(student, teacher, x0, noise, t)
        loss.backward()
        got = _grads(student)
        student.zero_grad()
        torch.manual_seed(5)
        ref_loss, ref_terms = (k_times if (step + 1) % 3 == 0 else get_finetuner("kd")).loss(
            student, teacher, x0, noise, t)
        ref_loss.backward()
        assert torch.allclose(got, _grads(student), rtol=1e-10, atol=1e-12), step
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
        assert ("jac" in terms) == ((step + 1) % 3 == 0)  # steps 3 and 6, counted from 1
        contributions.append(0.3 * terms.get("jac", 0.0))
        torch.manual_seed(5)
        every_step.append(0.3 * reference.loss(student, teacher, x0, noise, t)[1]["jac"])
    # per step, the term contributes on average what the every-step term contributes
    assert sum(contributions) / 6 == pytest.approx(sum(every_step) / 6, rel=1e-12)


def test_jac_every_needs_the_step_and_is_validated_like_the_other_options():
    student, teacher = TinyNet(seed=1), TinyNet(seed=2)
    with pytest.raises(ValueError, match=r"jac_every=2 needs the optimisation step"):
        get_finetuner("2ndmatch", jac_every=2).loss(student, teacher, *_inputs())
    for bad in (0, -1):
        with pytest.raises(ValueError, match=rf"jac_every={bad} is not allowed: .*greater than or equal to 1"):
            get_finetuner("2ndmatch", jac_every=bad)
    with pytest.raises(ValueError, match=r"jac_every=1.5 is not allowed"):
        get_finetuner("2ndmatch", jac_every=1.5)
    with pytest.raises(ValueError, match=r"finetuner 'kd' has no option 'jac_every'"):
        get_finetuner("kd", jac_every=2)


class _Counting(torch.nn.Module):
    """Wraps a model; records the rows of every call and whether gradients were on."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x, t, **kw):
        self.calls.append((x.shape[0], torch.is_grad_enabled()))
        return self.model(x, t, **kw)


def test_kd_perturb_is_kd_at_the_antithetic_pair_at_the_samples_noise_scale():
    student, teacher = _Counting(TinyNet(seed=1).double()), _Counting(TinyNet(seed=2).double())
    x0, noise, t = _double_inputs()
    ft = get_finetuner("kd", kd_perturb="noise", lambda_kd=0.5)
    torch.manual_seed(3)
    loss, terms = ft.loss(student, teacher, x0, noise, t)
    loss.backward()
    assert student.calls == [(12, True)] and teacher.calls == [(8, False)]  # 3 student, 2 teacher rows a sample
    assert all(p.grad is None for p in teacher.parameters())
    # an independent computation: the same draw of g, each model called on its own
    abar = ft.scheduler.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    torch.manual_seed(3)
    step = (1 - abar).sqrt() * torch.randn_like(x_t)
    s, te = student.model, teacher.model
    with torch.no_grad():
        kd = [(s(x, t) - te(x, t)).pow(2).sum(dim=(1, 2, 3)) for x in (x_t + step, x_t - step)]
        dsm = (s(x_t, t) - noise).pow(2).sum(dim=(1, 2, 3)).mean()
    assert terms["kd"] == pytest.approx(((kd[0] + kd[1]) / 2).mean().item(), rel=1e-12)
    assert terms["dsm"] == pytest.approx(dsm.item(), rel=1e-12)
    assert loss.item() == pytest.approx(dsm.item() + 0.5 * terms["kd"], rel=1e-12)


class _Linear(torch.nn.Module):
    def __init__(self, seed, d=6):
        super().__init__()
        self.a = torch.nn.Parameter(torch.randn(d, d, generator=torch.Generator().manual_seed(seed)).double())

    def forward(self, x, t):
        return (x.flatten(1) @ self.a.T).view_as(x)


@pytest.mark.slow
def test_kd_perturb_pays_what_the_vector_noise_variant_adds():
    """For linear models the pair's kd is exactly kd(x_t) + s_t^2 ||dA g||^2: in expectation over g,
    kd at x_t plus (1 - abar_t) ||J_S - J_T||_F^2, the expected term of 2ndmatch's vector matching
    with noise weighting at lambda_jac 1 and jac_reference_dims 1 (J from explicit Jacobians)."""
    from helpers.jacobians import explicit_jacobians

    student, teacher = _Linear(1), _Linear(2)
    x0, noise = torch.randn(1, 1, 2, 3).double(), torch.randn(1, 1, 2, 3).double()
    t = torch.tensor([400])
    jacobian_gap = (explicit_jacobians(student, x0, t) - explicit_jacobians(teacher, x0, t))[0]
    abar = float(get_finetuner("kd").scheduler.alphas_cumprod[400])
    expected_extra = (1 - abar) * jacobian_gap.pow(2).sum().item()
    plain = get_finetuner("kd").loss(student, teacher, x0, noise, t)[1]["kd"]
    perturb = get_finetuner("kd", kd_perturb="noise")
    variant = get_finetuner("2ndmatch", mode="vjp", jac_match="vector", jac_weighting="noise", lambda_jac=1.0,
                            jac_reference_dims=1)
    draws = 4000
    torch.manual_seed(0)
    perturbed = sum(perturb.loss(student, teacher, x0, noise, t)[1]["kd"] for _ in range(draws)) / draws
    jac = sum(variant.loss(student, teacher, x0, noise, t)[1]["jac"] for _ in range(draws)) / draws
    assert perturbed - plain == pytest.approx(expected_extra, rel=0.05)
    assert jac == pytest.approx(expected_extra, rel=0.05)




# --- flow matching -------------------------------------------------------------------------------

def _flow_scheduler(shift=3.0):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def _shifted_sigma(t, shift=3.0, n=1000):
    """SD3's training sigma of timestep index t (noise growing with t), written out: s = (t + 1) / T,
    shifted to shift s / (1 + (shift - 1) s)."""
    s = (t.double() + 1) / n
    return shift * s / (1 + (shift - 1) * s)


class _Recorder(torch.nn.Module):
    """TinyNet that keeps the inputs it was called with."""

    def __init__(self, seed):
        super().__init__()
        self.net, self.calls = TinyNet(seed=seed).double(), []

    def forward(self, x, t):
        self.calls.append((x.detach().clone(), t.detach().clone()))
        return self.net(x, t)


def test_flow_matching_noises_linearly_and_regresses_the_velocity_at_the_networks_timestep():
    x0, noise, _ = (a.double() if a.is_floating_point() else a for a in _inputs())
    t = torch.tensor([0, 10, 500, 999])
    sigma = _shifted_sigma(t).view(-1, 1, 1, 1)
    for name in ("dsm", "kd"):
        student, teacher = _Recorder(1), _Recorder(2)
        _, terms = get_finetuner(name, scheduler=_flow_scheduler()).loss(student, teacher, x0, noise, t)
        x_t, model_t = student.calls[0]
        assert torch.allclose(x_t, (1 - sigma) * x0 + sigma * noise, rtol=1e-6, atol=1e-7)  # (float32 sigmas)
        assert torch.allclose(model_t.double(), sigma.flatten() * 1000, rtol=1e-6)  # sigma * T, as SD3 trains
        v_student = student.net(x_t, model_t)
        want = {"dsm": (v_student - (noise - x0)), "kd": (v_student - teacher.net(x_t, model_t))}[name]
        assert terms[name] == pytest.approx(want.pow(2).flatten(1).sum(1).mean().item(), rel=1e-9)


@pytest.mark.parametrize("mode", ["jvp", "vjp"])
@pytest.mark.parametrize("match, weighting", [("norm", "none"), ("vector", "noise"), ("vector", "x0")])
def test_the_jacobian_term_of_a_velocity_field_matches_explicit_jacobians(mode, match, weighting):
    student, teacher = TinyNet(seed=1).double(), TinyNet(seed=2).double()
    x0, noise, _ = (a.double() if a.is_floating_point() else a for a in _inputs())
    t = torch.tensor([0, 10, 500, 999])
    ft = get_finetuner("2ndmatch", mode=mode, jac_match=match, jac_weighting=weighting, scheduler=_flow_scheduler())
    torch.manual_seed(3)
    _, terms = ft.loss(student, teacher, x0, noise, t)
    torch.manual_seed(3)
    x_t = ft.add_noise(x0, noise, t)
    v = sample_directions(x_t)
    sigma = _shifted_sigma(t)  # both weightings: x_t's noise is sigma e, and x0 = x_t - sigma v
    scale = torch.ones(4, dtype=torch.float64) if weighting == "none" else sigma
    per_sample = _explicit_match(student, teacher, x_t, (sigma * 1000).float().double(), v, mode, match, scale)
    assert terms["jac"] == pytest.approx(per_sample.mean().item(), rel=1e-6)
    form = TermForm(match=match, weighting=weighting)
    functional = second_match_loss(student, teacher, x_t, (sigma * 1000).float(), v=v, mode=mode, form=form,
                                   scheduler=ft.scheduler)
    assert functional.item() == pytest.approx(per_sample.mean().item(), rel=1e-6)


def test_the_jacobian_floor_under_flow_matching_is_on_the_networks_timestep():
    # at shift 3, ranks 16 and 17 straddle sigma * T = 50 (49.3 and 52.1): jac_min_timestep 50 reads
    # the timestep the network is given (diffusers' SD3 timesteps), not the rank (which keeps 50 up)
    student, teacher = TinyNet(seed=1).double(), TinyNet(seed=2).double()
    x0, noise, _ = (a.double() if a.is_floating_point() else a for a in _inputs())
    t = torch.tensor([5, 16, 17, 100])
    ft = get_finetuner("2ndmatch", mode="jvp", jac_min_timestep=50, scheduler=_flow_scheduler())
    torch.manual_seed(3)
    _, terms = ft.loss(student, teacher, x0, noise, t)
    torch.manual_seed(3)
    x_t = ft.add_noise(x0, noise, t)
    model_t = (_shifted_sigma(t) * 1000).float().double()
    per_sample = _explicit_match(student, teacher, x_t, model_t, sample_directions(x_t), "jvp", "norm",
                                 torch.ones(4, dtype=torch.float64))
    kept = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    assert per_sample[:2].min() > 0  # the floor is what makes them zero
    assert terms["jac"] == pytest.approx((per_sample * kept).mean().item(), rel=1e-6)


def test_kd_at_perturbed_inputs_uses_sigma_under_flow_matching():
    from nni_2ndmatch.method import noise_scale

    t = torch.tensor([0, 500, 999])
    got = noise_scale((_shifted_sigma(t) * 1000).float(), _flow_scheduler())
    assert torch.allclose(got, _shifted_sigma(t), rtol=1e-6)
    # the whole term: kd at x_t +/- sigma g, the network at sigma * T, dsm the velocity at x_t
    student, teacher = TinyNet(seed=1).double(), TinyNet(seed=2).double()
    x0, noise, _ = (a.double() if a.is_floating_point() else a for a in _inputs())
    t = torch.tensor([0, 10, 500, 999])
    torch.manual_seed(3)
    _, terms = get_finetuner("kd", kd_perturb="noise", scheduler=_flow_scheduler()).loss(student, teacher, x0, noise, t)
    sigma = _shifted_sigma(t).view(-1, 1, 1, 1)
    x_t, model_t = (1 - sigma) * x0 + sigma * noise, (sigma.flatten() * 1000).float().double()
    torch.manual_seed(3)
    step = sigma * torch.randn_like(x_t)
    with torch.no_grad():
        kd = [(student(x, model_t) - teacher(x, model_t)).pow(2).sum(dim=(1, 2, 3)) for x in (x_t + step, x_t - step)]
        dsm = (student(x_t, model_t) - (noise - x0)).pow(2).sum(dim=(1, 2, 3)).mean()
    assert terms["kd"] == pytest.approx(((kd[0] + kd[1]) / 2).mean().item(), rel=1e-6)
    assert terms["dsm"] == pytest.approx(dsm.item(), rel=1e-6)
