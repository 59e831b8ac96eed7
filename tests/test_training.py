"""The finetuning loop: reproducible, resumable bit-exactly, atomic checkpoints, non-finite steps."""

import json

import pytest
import torch
from helpers.tiny_models import tiny_unet2d
from helpers.training import Images, run_tiny
from pydantic import ValidationError

from nni_2ndmatch import NonFiniteLossError, TrainConfig, finetune, get_finetuner
from nni_2ndmatch.data import batch_indices
from nni_2ndmatch.method import sample_timesteps
from nni_2ndmatch.training import Watch


@pytest.mark.slow  # runs of several steps: the full suite's
def test_same_seed_same_weights_and_teacher_untouched(tmp_path):
    a, teacher = run_tiny(tmp_path / "a", 4)
    b, _ = run_tiny(tmp_path / "b", 4)
    assert all(torch.equal(p, q) for p, q in zip(a.student.state_dict().values(), b.student.state_dict().values()))
    fresh = tiny_unet2d(seed=2)
    assert all(torch.equal(p, q) for p, q in zip(teacher.state_dict().values(), fresh.state_dict().values()))
    assert all(p.requires_grad for p in teacher.parameters()) and teacher.training
    assert [h["step"] for h in a.history] == [1, 2, 3, 4]
    assert {"dsm", "kd", "jac", "loss", "lr"} <= set(a.history[0])


@pytest.mark.slow  # runs of several steps: the full suite's
def test_resume_continues_bit_exactly(tmp_path):
    full, _ = run_tiny(tmp_path / "full", 7)
    run_tiny(tmp_path / "crash", 4)  # as if the run had died after step 4 (checkpoint at 3 and 4)
    resumed, _ = run_tiny(tmp_path / "crash", 7, resume=True)
    for (k, p), q in zip(full.student.state_dict().items(), resumed.student.state_dict().values()):
        assert torch.equal(p, q), k
    assert [h["loss"] for h in full.history] == [h["loss"] for h in resumed.history]
    lines = (tmp_path / "crash" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, 8))


@pytest.mark.slow  # runs of several steps: the full suite's
def test_a_resumed_run_counts_each_parts_process_seconds_on_its_own_processes(tmp_path):
    """A run whose first part ran on 4 processes and whose resume runs on 1: the equal-wallclock
    baselines get the first part's seconds x 4 plus the second's x 1, not the whole run's x 1."""
    from nni_2ndmatch.job.results import RunSummary

    first, _ = run_tiny(tmp_path, 2)
    assert first.process_seconds == pytest.approx(first.seconds - first.overhead_seconds)  # one process
    meta_file = tmp_path / "checkpoints" / "step-0000002" / "state.json"
    meta = json.loads(meta_file.read_text())
    part = meta["seconds"] - meta["overhead_seconds"]
    meta["process_seconds"] = 4 * part  # as if this part had run on 4 processes
    meta_file.write_text(json.dumps(meta))
    resumed, _ = run_tiny(tmp_path, 4, resume=True)
    second = (resumed.seconds - resumed.overhead_seconds) - part
    assert second > 0 and resumed.process_seconds == pytest.approx(4 * part + second)
    summary = RunSummary(finetuner="kd", finetuner_options={}, train_config={}, steps=4, seconds=resumed.seconds,
                         final={}, teacher_params=2, student_params=1, processes=1,
                         overhead_seconds=resumed.overhead_seconds, process_seconds=resumed.process_seconds)
    assert summary.equal_time_steps(part / 100) == round((4 * part + second) / (part / 100))


@pytest.mark.slow  # runs of several steps: the full suite's
def test_jac_every_resumed_between_two_term_steps_equals_an_uninterrupted_run(tmp_path):
    options = {"jac_every": 3}  # the term on steps 3 and 6 (counted from 1)
    full, _ = run_tiny(tmp_path / "full", 7, options=options)
    run_tiny(tmp_path / "crash", 4, options=options)  # died after step 4: between the term steps 3 and 6
    resumed, _ = run_tiny(tmp_path / "crash", 7, resume=True, options=options)
    for (k, p), q in zip(full.student.state_dict().items(), resumed.student.state_dict().values()):
        assert torch.equal(p, q), k
    assert [h["step"] for h in resumed.history if "jac" in h] == [3, 6]
    assert [h["loss"] for h in full.history] == [h["loss"] for h in resumed.history]
    every_step, _ = run_tiny(tmp_path / "every", 7)  # the term changes the weights it reaches
    assert not all(torch.equal(p, q) for p, q in zip(full.student.state_dict().values(),
                                                     every_step.student.state_dict().values()))


@pytest.mark.slow  # runs of several steps: the full suite's
def test_checkpoints_are_complete_and_pruned(tmp_path):
    run_tiny(tmp_path, 7)
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text().strip() == "step-0000007"
    assert sorted(p.name for p in root.glob("step-*")) == ["step-0000006", "step-0000007"]
    assert not list(root.glob(".*tmp"))
    state = json.loads((root / "step-0000007" / "state.json").read_text())
    assert state["step"] == 7 and state["finetuner"] == "2ndmatch"


@pytest.mark.slow  # runs of several steps: the full suite's
def test_resume_ignores_an_incomplete_checkpoint(tmp_path):
    run_tiny(tmp_path, 3)
    (tmp_path / "checkpoints" / ".step-0000006.abc.tmp").mkdir()  # a crash in the middle of a write
    (tmp_path / "checkpoints" / ".step-0000006.abc.tmp" / "state.safetensors").write_bytes(b"trunc")
    res, _ = run_tiny(tmp_path, 4, resume=True)
    assert res.history[-1]["step"] == 4


def test_resume_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        run_tiny(tmp_path, 3, resume=True)


class Exploding(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = tiny_unet2d(seed=1)

    def forward(self, x, t):
        return self.inner(x, t).sample * float("nan")


def test_non_finite_loss_skips_steps_then_stops(tmp_path, caplog):
    student = Exploding()
    before = [p.clone() for p in student.parameters()]
    config = TrainConfig(steps=10, batch_size=4, max_nonfinite_steps=3)
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps.*term\\(s\\) dsm.*timesteps"):
        finetune(student, None, get_finetuner("dsm"), Images(), config, tmp_path, watch=Watch(progress=False))
    assert all(torch.equal(p, q) for p, q in zip(before, student.parameters()))
    assert not (tmp_path / "checkpoints" / "latest").exists()
    assert caplog.text.count("step skipped") == 3


def test_only_the_main_process_warns_of_a_skipped_step(caplog):
    """The terms are the mean over processes: the same warning in each would repeat it N times."""
    from nni_2ndmatch import Runtime

    class SecondOfTwo(Runtime):
        rank, world_size = 1, 2

    with pytest.raises(NonFiniteLossError):  # the error is raised in every process: each stops
        finetune(Exploding(), None, get_finetuner("dsm"), Images(), TrainConfig(steps=10, batch_size=4,
                 max_nonfinite_steps=2), runtime=SecondOfTwo(), watch=Watch(progress=False))
    assert "step skipped" not in caplog.text


def test_a_finite_loss_with_a_non_finite_gradient_is_skipped_too(tmp_path):
    class Kinked(torch.nn.Module):  # d sqrt(a) / da at a = 0 is inf: the loss is finite, its gradient not
        def __init__(self):
            super().__init__()
            self.inner, self.a = tiny_unet2d(seed=1), torch.nn.Parameter(torch.zeros(()))

        def forward(self, x, t):
            return self.inner(x, t).sample + self.a.sqrt()

    student = Kinked()
    before = [p.clone() for p in student.parameters()]
    config = TrainConfig(steps=10, batch_size=4, max_nonfinite_steps=3)
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps with a non-finite loss or gradient.*grad_norm"):
        finetune(student, None, get_finetuner("dsm"), Images(), config, tmp_path, watch=Watch(progress=False))
    assert all(torch.equal(p, q) for p, q in zip(before, student.parameters()))  # no NaN reached the weights


def test_a_skipped_last_step_still_ends_the_run_with_its_checkpoint(tmp_path):
    class LastStepFails(torch.nn.Module):  # dsm calls the student once a step: the 3rd call is the last step
        def __init__(self):
            super().__init__()
            self.inner, self.calls = tiny_unet2d(seed=1), 0

        def forward(self, x, t):
            self.calls += 1
            return self.inner(x, t).sample * (float("nan") if self.calls == 3 else 1.0)

    config = TrainConfig(steps=3, batch_size=4, checkpoint_every=2, log_every=1)
    result = finetune(LastStepFails(), None, get_finetuner("dsm"), Images(), config, tmp_path,
                      watch=Watch(progress=False))
    assert [h["step"] for h in result.history] == [1, 2]  # the skipped step logs nothing
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-0000003"


@pytest.mark.slow
def test_training_reduces_the_loss(tmp_path):
    student = tiny_unet2d(seed=1)
    config = TrainConfig(steps=60, batch_size=8, lr=2e-3, ema_decay=None, log_every=10, antithetic=False)
    res = finetune(student, None, get_finetuner("dsm"), Images(), config, watch=Watch(progress=False))
    assert res.history[-1]["loss"] < 0.7 * res.history[0]["loss"]


def test_data_order_and_timesteps():
    a = batch_indices(5, 24, 4, seed=1)
    assert torch.equal(a, batch_indices(5, 24, 4, seed=1)) and len(a) == 4
    epoch = torch.cat([batch_indices(s, 24, 4, seed=1) for s in range(6)])
    assert sorted(epoch.tolist()) == list(range(24))
    t = sample_timesteps(6, 1000, antithetic=True)
    assert torch.equal(t[:3] + t[3:], torch.full((3,), 999))


@pytest.mark.parametrize("mean, std", [(0.0, 1.0), (0.7, 0.5)])
def test_logit_normal_timesteps_are_the_ones_sd3s_training_scripts_draw(mean, std):
    """SD3's scripts draw u = sigmoid(N(mean, std)) and train at the flow scheduler's
    timesteps[floor(u T)]; the drawn ranks give exactly those sigmas, and logit(1 - sigma) (shift 1)
    is N(mean, std) by a Kolmogorov-Smirnov test against scipy's normal."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from scipy import stats

    from nni_2ndmatch.method import model_timesteps

    t = sample_timesteps(4000, 1000, antithetic=False, generator=torch.Generator().manual_seed(3),
                         density="logit_normal", logit_mean=mean, logit_std=std)
    z = torch.randn(4000, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    u = torch.sigmoid(mean + std * z)
    for shift in (1.0, 3.0):
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        expected = scheduler.timesteps[(u * 1000).long()]
        torch.testing.assert_close(model_timesteps(t, scheduler), expected.float(), rtol=1e-6, atol=1e-3)
    sigma = (t.double() + 1) / 1000  # shift 1
    logits = torch.log((1 - sigma + 1e-3 / 2) / (sigma - 1e-3 / 2)).numpy()  # the rank's midpoint
    assert stats.kstest(logits, stats.norm(mean, std).cdf).pvalue > 0.01
    pairs = sample_timesteps(6, 1000, antithetic=True, generator=torch.Generator().manual_seed(0),
                             density="logit_normal")  # antithetic: z and -z, so u and 1 - u at mean 0
    assert (pairs[:3] + pairs[3:] - 998).abs().max() <= 1


def test_logit_options_without_their_density_are_an_error():
    with pytest.raises(ValidationError, match="logit_std given with timestep_density='uniform'"):
        TrainConfig(logit_std=2.0)
    with pytest.raises(ValidationError, match="timestep_density"):
        TrainConfig(timestep_density="lognormal")
    assert TrainConfig(timestep_density="logit_normal", logit_mean=0.5).logit_mean == 0.5
    # every field given explicitly (as the config file's section rebuilds it) is no error at the defaults
    assert TrainConfig(**TrainConfig().model_dump()) == TrainConfig()
    from nni_2ndmatch.config import FinetuneSection

    assert FinetuneSection().train_config().timestep_density == "uniform"


def test_bad_train_config_names_the_field():
    with pytest.raises(ValidationError, match="lr"):
        TrainConfig(lr=-1)
    with pytest.raises(ValidationError, match="lr_schedule"):
        TrainConfig(lr_schedule="exp")
    with pytest.raises(ValidationError, match="stepz"):
        TrainConfig(stepz=3)
    cfg = TrainConfig(steps=10, warmup_steps=2, lr=1.0e-3, lr_schedule="linear")
    assert [round(cfg.lr_at(s), 6) for s in (0, 1, 2, 6)] == [5e-4, 1e-3, 1e-3, 5e-4]


def test_conditional_data_items_pass_their_conditioning_to_the_models(tmp_path):
    from helpers.tiny_models import tiny_dit

    class Labelled(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return {"sample": torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(i)),
                    "class_labels": torch.tensor(i % 10)}

    seen = []
    student, teacher = tiny_dit(seed=1), tiny_dit(seed=2)
    teacher.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["class_labels"].tolist()), with_kwargs=True)
    config = TrainConfig(steps=2, batch_size=4, seed=3)
    res = finetune(student, teacher, get_finetuner("2ndmatch", mode="vjp"), Labelled(), config,
                   watch=Watch(progress=False))
    expected = [sorted(batch_indices(s, 8, 4, seed=3).tolist()) for s in range(2)]
    assert [sorted(x) for x in seen] == expected
    assert res.history[-1]["jac"] >= 0


def test_bf16_autocasts_the_network_passes_but_the_jacobian_evaluations_stay_fp32(tmp_path):
    """First step, same weights: 2ndmatch's terms all come from the Jacobian evaluations (fp32 by
    design), so bf16 leaves them unchanged; kd's passes run in bf16 and change."""
    def first_terms(finetuner, precision):
        res, _ = run_tiny(tmp_path / f"{finetuner}-{precision}", 1, finetuner=finetuner, mixed_precision=precision)
        return res.history[0]

    fp32, bf16 = first_terms("2ndmatch", "no"), first_terms("2ndmatch", "bf16")
    assert {k: fp32[k] for k in ("dsm", "kd", "jac")} == {k: bf16[k] for k in ("dsm", "kd", "jac")}
    kd32, kd16 = first_terms("kd", "no"), first_terms("kd", "bf16")
    assert kd32["dsm"] != kd16["dsm"] and kd16["dsm"] == pytest.approx(kd32["dsm"], rel=0.05)
    with pytest.raises(ValidationError, match="mixed_precision"):
        TrainConfig(mixed_precision="fp16")


@pytest.mark.slow  # runs of several steps: the full suite's
def test_the_loops_random_stream_does_not_depend_on_how_the_batch_is_split(tmp_path):
    """2ndmatch draws directions inside its loss, for the samples it is given; the noise and
    timesteps of every step must still be those of the global batch, whether it is split into
    accumulation micro-batches or between processes (here: process 0 of 2, without the sync)."""
    from nni_2ndmatch import Runtime
    from nni_2ndmatch.finetuners import SecondMatch

    class FirstOfTwo(Runtime):
        world_size = 2

    seen = {}

    class Recording(SecondMatch):
        def loss(self, student, teacher, x0, noise, timesteps, **kw):
            seen.setdefault(self.tag, []).append((noise.clone(), timesteps.clone()))
            return super().loss(student, teacher, x0, noise, timesteps, **kw)

    for tag, accumulation, runtime in (("whole", 1, Runtime()), ("accumulated", 2, Runtime()),
                                       ("process 0", 1, FirstOfTwo())):
        finetuner = Recording(lambda_jac=1.0)
        finetuner.tag = tag
        config = TrainConfig(steps=3, batch_size=6, seed=11, hflip=True, gradient_accumulation_steps=accumulation)
        finetune(tiny_unet2d(seed=1, width=0.5), tiny_unet2d(seed=2), finetuner, Images(), config, runtime=runtime,
                 watch=Watch(progress=False))
    whole, halves = seen["whole"], seen["accumulated"]
    assert len(whole) == 3 and len(halves) == 6 and len(seen["process 0"]) == 3
    for step, (noise, timesteps) in enumerate(whole):
        first, second = halves[2 * step], halves[2 * step + 1]
        assert torch.equal(noise, torch.cat([first[0], second[0]]))
        assert torch.equal(timesteps, torch.cat([first[1], second[1]]))
        assert torch.equal(noise[0::2], seen["process 0"][step][0])
        assert torch.equal(timesteps[0::2], seen["process 0"][step][1])


@pytest.mark.parametrize("mode", ["vjp", "fd"])
def test_2ndmatch_with_no_jacobian_weight_trains_exactly_like_kd(tmp_path, mode):
    """The Jacobian machinery (its evaluations serve DSM and KD, its directions come from their own
    generator) must not change the other terms' training: lambda_jac = 0 gives kd's weights.
    Full width: with one channel per GroupNorm group, biases before the norm have a zero gradient
    whose rounding noise Adam turns into whole steps."""
    def weights(finetuner):
        config = TrainConfig(steps=4, batch_size=4, seed=3, hflip=True)
        res = finetune(tiny_unet2d(seed=1), tiny_unet2d(seed=2), finetuner, Images(), config,
                       watch=Watch(progress=False))
        return res.student.state_dict()

    from nni_2ndmatch.finetuners import SecondMatchOptions, finetuner_class

    # built past the options' checks: a user's lambda_jac 0 is refused (the term's full cost for nothing)
    off = SecondMatchOptions.model_construct(**{**SecondMatchOptions().model_dump(), "lambda_jac": 0.0, "mode": mode})
    kd, second = weights(get_finetuner("kd")), weights(finetuner_class("2ndmatch")(options=off))
    assert max((kd[k] - second[k]).abs().max().item() for k in kd) < 2e-5


@pytest.mark.parametrize("make, expected", [
    (lambda: get_finetuner("kd", lambda_dsm=0.0, lambda_kd=0.0), r"every loss weight is 0 \(lambda_dsm, lambda_kd\)"),
    (lambda: get_finetuner("2ndmatch", lambda_jac=0.0), r"lambda_jac=0.0 is not allowed: the Jacobian term would"),
    (lambda: get_finetuner("2ndmatch", mode="vjp", fd_step=0.5), r"fd_step=0.5 is not allowed: .*not of mode 'vjp'"),
    (lambda: TrainConfig(steps=10, warmup_steps=500), r"warmup_steps\n.*never reach lr in steps=10"),
    (lambda: finetune(tiny_unet2d(seed=1), tiny_unet2d(seed=2), get_finetuner("2ndmatch", jac_every=10, mode="vjp"),
                      Images(), TrainConfig(steps=3, batch_size=4)), r"jac_every=10 is not allowed: with steps 3"),
    (lambda: finetune(tiny_unet2d(seed=1), tiny_unet2d(seed=2), get_finetuner("2ndmatch", jac_min_timestep=5000),
                      Images(), TrainConfig(steps=3, batch_size=4)),
     r"jac_min_timestep=5000 is not allowed: the teacher's schedule has timesteps below 1000"),
])
def test_the_python_api_refuses_what_the_config_file_refuses(make, expected):
    """An option that would do nothing (or train on a zero loss) is refused by the strategy's and
    the loop's own checks, so the API and NNI's distiller refuse it as a config file does."""
    with pytest.raises(ValueError, match=expected):
        make()


def test_a_resume_that_would_not_continue_the_checkpointed_run_is_refused(tmp_path):
    """finetune(resume=True) compares the checkpoint's strategy, options and loop options with the
    run's: what changes the weights, fewer steps than done, or no folder, is refused before training."""
    run_tiny(tmp_path / "run", 4, finetuner="kd")
    for finetuner, options, cfg, expected in (
            ("2ndmatch", {"mode": "vjp"}, {}, r"finetuner \('kd' -> '2ndmatch'\)"),
            ("kd", {"lambda_kd": 0.5}, {}, r"lambda_kd \(1.0 -> 0.5\)"),
            ("kd", {}, {"ema_decay": None, "dropout": 0.1}, r"dropout \(None -> 0.1\), ema_decay \(0.9999 -> None\)"),
            ("kd", {}, {"lr_schedule": "cosine"}, r"lr_schedule \('constant' -> 'cosine'\)"),
            ("kd", {}, {"steps": 2}, r"steps=2 is below the checkpoint's step 4")):
        steps = cfg.pop("steps", 6)
        with pytest.raises(ValueError, match=expected):
            run_tiny(tmp_path / "run", steps, resume=True, finetuner=finetuner, options=options, **cfg)
    run_tiny(tmp_path / "run", 6, resume=True, finetuner="kd", keep_checkpoints=3)  # what keeps the weights may
    with pytest.raises(ValueError, match="needs the output_dir"):
        finetune(tiny_unet2d(seed=1), tiny_unet2d(seed=2), get_finetuner("kd"), Images(), TrainConfig(), resume=True)
    with pytest.raises(ValueError, match="resume=True and overwrite=True"):
        finetune(tiny_unet2d(seed=1), tiny_unet2d(seed=2), get_finetuner("kd"), Images(), TrainConfig(batch_size=4),
                 tmp_path / "run", resume=True, overwrite=True)


def test_dropout_applies_to_the_residual_blocks_during_the_run_only(tmp_path):
    student, teacher = tiny_unet2d(seed=1, width=0.5), tiny_unet2d(seed=2)
    seen = []
    for name, m in student.named_modules():
        if name.endswith("resnets.0.dropout"):
            m.register_forward_hook(lambda mod, args, out: seen.append(mod.p))
    config = TrainConfig(steps=2, batch_size=4, seed=3, dropout=0.1, ema_decay=None)
    finetune(student, teacher, get_finetuner("kd"), Images(), config, watch=Watch(progress=False))
    assert seen and set(seen) == {0.1}
    assert {m.p for m in student.modules() if isinstance(m, torch.nn.Dropout)} == {0.0}  # restored
    a, _ = run_tiny(tmp_path / "a", 2, finetuner="kd", dropout=0.1)
    b, _ = run_tiny(tmp_path / "b", 2, finetuner="kd", dropout=0.1)
    c, _ = run_tiny(tmp_path / "c", 2, finetuner="kd")
    same = [torch.equal(p, q) for p, q in zip(a.student.parameters(), b.student.parameters())]
    differ = [torch.equal(p, q) for p, q in zip(a.student.parameters(), c.student.parameters())]
    assert all(same) and not all(differ)
    with pytest.raises(ValueError, match="dropout=0.1 is not allowed for this student"):
        finetune(torch.nn.Conv2d(1, 1, 3, padding=1), teacher, get_finetuner("dsm"), Images(), config,
                 watch=Watch(progress=False))


@pytest.mark.parametrize("kind", ["unet2d", "unet2d_condition", "dit"])
@pytest.mark.parametrize("mode", ["vjp", "fd"])
def test_gradient_checkpointing_gives_the_unchecked_gradient_of_the_jacobian_term(kind, mode, monkeypatch):
    import copy

    from helpers.tiny_models import BUILDERS, example_inputs

    import nni_2ndmatch.method.jacobian as jacobian

    teacher, student = BUILDERS[kind]().double().eval(), BUILDERS[kind](seed=1).double().train()
    x, t, kw = example_inputs(kind, batch=3)
    noise = torch.randn_like(x)
    finetuner = get_finetuner("2ndmatch", mode=mode, lambda_jac=1.0)
    calls = []
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, _f=torch.utils.checkpoint.checkpoint, **k:
                        calls.append(1) or _f(*a, **k))
    grads = []
    for checked in (False, True):
        model = copy.deepcopy(student)
        if checked:
            model.enable_gradient_checkpointing(jacobian.checkpoint_as_forward)
        torch.manual_seed(5)
        loss, terms = finetuner.loss(model, teacher, x, noise, t.long(), **kw)
        assert terms["jac"] > 0
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        assert bool(calls) == checked  # the blocks really were checkpointed
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-12)


def test_finetune_with_gradient_checkpointing_trains_the_same_and_refuses_forward_mode(tmp_path, monkeypatch):
    a, _ = run_tiny(tmp_path / "a", 2)
    calls = []
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, _f=torch.utils.checkpoint.checkpoint, **k:
                        calls.append(1) or _f(*a, **k))
    b, _ = run_tiny(tmp_path / "b", 2, gradient_checkpointing=True)
    assert calls and not b.student.is_gradient_checkpointing  # used, and for the run only
    first = [{k: v for k, v in r.history[0].items() if k not in ("seconds", "grad_norm")} for r in (a, b)]
    assert first[0] == first[1]  # the same first step: the forward is recomputed bit for bit
    # the backward's sums may run in another order (float64 test above: the same gradient to 1e-10)
    assert a.history[0]["grad_norm"] == pytest.approx(b.history[0]["grad_norm"], rel=1e-5)
    # Adam's first updates are about lr * sign(grad): fp32 rounding can move a weight by up to 2 lr a step
    for p, q in zip(a.student.parameters(), b.student.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=2 * 2 * 2e-4)
    student, teacher = tiny_unet2d(seed=1, width=0.5), tiny_unet2d(seed=2)
    config = TrainConfig(steps=2, batch_size=4, gradient_checkpointing=True)
    with pytest.raises(ValueError, match="gradient_checkpointing=True is not allowed with mode 'jvp'"):
        finetune(student, teacher, get_finetuner("2ndmatch", mode="jvp"), Images(), config, watch=Watch(progress=False))
    with pytest.raises(ValueError, match="gradient_checkpointing=True is not allowed for Conv2d"):
        finetune(torch.nn.Conv2d(1, 1, 3, padding=1), teacher, get_finetuner("dsm"), Images(), config,
                 watch=Watch(progress=False))


def test_the_ema_follows_its_parameters_where_the_runtime_moves_them(tmp_path):
    """The student's EMA is taken before the runtime moves the student (to a GPU, or another dtype
    here, which a CPU can show): the shadow goes with it, and the run trains."""
    from nni_2ndmatch.training import EMA, Runtime

    params = [torch.ones(3), torch.zeros(2, 2)]
    ema = EMA(params, 0.9)
    moved = [p.double() for p in params]
    ema.follow(moved)
    assert [e.dtype for e in ema.shadow] == [torch.float64] * 2
    ema.step([p + 1 for p in moved], step=100)
    assert torch.allclose(ema.shadow[0], torch.full((3,), 1.1, dtype=torch.float64))

    class Widening(Runtime):  # prepare moves both models to float64 (and the batches with them)
        def prepare(self, student, teacher):
            student.double(), teacher.double()
            return student

    class Doubles(Images):
        def __getitem__(self, i):
            return super().__getitem__(i).double()

    config = TrainConfig(steps=2, batch_size=4, ema_decay=0.9, checkpoint_every=100, log_every=1)
    result = finetune(tiny_unet2d(seed=1, width=0.5), tiny_unet2d(seed=2), get_finetuner("kd"), Doubles(), config,
                      runtime=Widening(), watch=Watch(progress=False))
    assert {p.dtype for p in result.student.parameters()} == {torch.float64}


def test_a_finetune_leaves_torchs_global_random_stream_alone(tmp_path):
    student, teacher, data = tiny_unet2d(seed=1, width=0.5), tiny_unet2d(seed=2), Images()  # (these seed it)
    config = TrainConfig(steps=2, batch_size=4, checkpoint_every=3, log_every=1, seed=11, hflip=True)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    finetune(student, teacher, get_finetuner("2ndmatch"), data, config, tmp_path, watch=Watch(progress=False))
    assert torch.equal(torch.rand(3), expected)
