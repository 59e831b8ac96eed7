"""Evaluation of a diffusion student against its teacher: deterministic DDIM sampling,
digits-FID, teacher fidelity and the Jacobian sensitivity profile.

digits-FID is the Frechet distance between the penultimate features (64-d) of the built-in digits
classifier for generated samples and for the held-out real digits (scikit-learn's at 8x8, or
MNIST's test set at 28x28 with the MNIST classifier): a domain-specific FID, like FID with LeNet
features on MNIST. It is not comparable to Inception FID.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import DigitsDataset, MnistDataset
from .method import (
    add_noise,
    is_flow_matching,
    jacobian_sensitivity,
    model_output,
    model_timesteps,
    own_schedule,
    sample_directions,
)
from .models.digits import MNIST_RESOLUTION, RESOLUTION, load_digits_classifier, load_mnist_classifier
from .models.pipelines import needs_transformers
from .scoped import seeded_generator


def ddim_scheduler(num_steps: int, scheduler: Any = None) -> Any:
    """Deterministic DDIM (eta=0) on the training schedule (linear betas 1e-4..0.02, 1000 steps), or
    on ``scheduler``'s where it has a schedule of its own (its betas, prediction type, clipping)."""
    from diffusers import DDIMScheduler

    if scheduler is not None and own_schedule(scheduler.config):
        sampling = DDIMScheduler.from_config(scheduler.config)
    else:
        sampling = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                                 clip_sample=True, set_alpha_to_one=True)
    sampling.set_timesteps(num_steps)
    return sampling


@torch.no_grad()
def ddim_sample(model: Callable[..., Any], noise: Tensor, num_steps: int = 50, batch_size: int = 256,
                scheduler: Any = None, **conditioning: Tensor) -> Tensor:
    """Samples from ``noise`` [N, C, H, W] with ``num_steps`` DDIM steps (on ``scheduler``'s schedule
    where it has its own, see :func:`ddim_scheduler`); the same noise and model give the same
    samples. Conditioning tensors have N rows."""
    scheduler = ddim_scheduler(num_steps, scheduler)
    outputs = []
    for start in range(0, noise.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        x = noise[rows].clone()
        cond = {k: v[rows] for k, v in conditioning.items()}
        for t in scheduler.timesteps:
            eps = model_output(model, x, torch.full((x.shape[0],), float(t), device=x.device), **cond)
            x = scheduler.step(eps, t, x).prev_sample
        outputs.append(x.clamp(-1.0, 1.0))
    return torch.cat(outputs)


@torch.no_grad()
def flow_sample(model: Callable[..., Any], noise: Tensor, scheduler: Any, num_steps: int = 50,
                batch_size: int = 256, **conditioning: Tensor) -> Tensor:
    """Samples of a flow-matching ``model`` (predicting the velocity e - x0) from ``noise``: Euler
    steps x += (sigma_next - sigma) v(x, sigma * T) on the sigmas the ``scheduler``'s config gives
    for ``num_steps`` sampling steps (its shift applied; the last sigma 0), as its pipeline samples."""
    sampling = type(scheduler).from_config(scheduler.config)
    sampling.set_timesteps(num_steps)
    sigmas, scale = sampling.sigmas.double().tolist(), float(scheduler.config.num_train_timesteps)
    outputs = []
    for start in range(0, noise.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        x = noise[rows].clone()
        cond = {k: v[rows] for k, v in conditioning.items()}
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            v = model_output(model, x, torch.full((x.shape[0],), sigma * scale, device=x.device), **cond)
            x = x + (sigma_next - sigma) * v
        outputs.append(x.clamp(-1.0, 1.0))
    return torch.cat(outputs)


def sample(model: Callable[..., Any], noise: Tensor, num_steps: int, scheduler: Any = None,
           batch_size: int = 256, **conditioning: Tensor) -> Tensor:
    """Deterministic samples from ``noise``, ``batch_size`` at a time: :func:`flow_sample` under a
    flow-matching ``scheduler``, otherwise :func:`ddim_sample` (on the scheduler's own schedule, or
    the reference DDPM one)."""
    if scheduler is not None and is_flow_matching(scheduler):
        return flow_sample(model, noise, scheduler, num_steps, batch_size, **conditioning)
    return ddim_sample(model, noise, num_steps, batch_size, scheduler, **conditioning)


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Frechet distance between Gaussians fitted to feature sets a [N, D] and b [M, D] (float64):
    ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    vals, vecs = torch.linalg.eigh(s_a)
    root_a = vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T
    middle = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + s_a.trace() + s_b.trace() - 2 * middle)


@torch.no_grad()
def digits_features(images: Tensor, classifier: torch.nn.Module | None = None) -> Tensor:

    classifier = classifier if classifier is not None else load_digits_classifier()
    return classifier.features(images.float().clamp(-1, 1))


#: the data sets digits-FID is defined for: (the classifier's resolution, the test images at a
#: resolution, as the built-in data give them, the classifier)
FID_DATA = {"digits": (RESOLUTION, lambda r: DigitsDataset(r, "test").images, load_digits_classifier),
            "mnist": (MNIST_RESOLUTION, lambda r: MnistDataset(r, "test").images, load_mnist_classifier)}


def _to_size(images: Tensor, size: int) -> Tensor:
    """Images resized to ``size`` (area when shrinking, bilinear when growing)."""
    if images.shape[-1] == size:
        return images.float()
    return F.interpolate(images.float(), size=(size, size), mode="area" if images.shape[-1] > size else "bilinear")


def digits_fid(samples: Tensor, classifier: torch.nn.Module | None = None, data: str = "digits") -> float:
    """digits-FID of 1xRxR samples in [-1, 1] against the held-out real images of ``data`` (the
    digits' test split, or MNIST's test set). Samples of another size than the classifier's (8x8,
    28x28) are resized to it (area when shrinking, bilinear when growing), and so are the held-out
    images, taken at the samples' resolution as the built-in data give them: real images score
    the same at any resolution (a resize of the samples alone costs a perfect model about 84).
    ``classifier``: default the built-in one of ``data``."""
    if data not in FID_DATA:
        raise ValueError(f"data={data!r} has no digits-FID; allowed: {', '.join(FID_DATA)}")
    size, reference, load = FID_DATA[data]
    resolution = samples.shape[-1]
    classifier = classifier if classifier is not None else load()
    known = _REFERENCE_FEATURES.setdefault(classifier, {})
    if (data, resolution) not in known:  # the held-out images' features, once per classifier (it is frozen)
        known[data, resolution] = digits_features(_to_size(reference(resolution), size), classifier)
    return frechet_distance(digits_features(_to_size(samples, size), classifier), known[data, resolution])


_REFERENCE_FEATURES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # classifier -> {data: features}


def fidelity(student_samples: Tensor, teacher_samples: Tensor) -> float:
    """Root-mean-square difference per pixel (images in [-1, 1]) between the samples of two models
    from the same noise, averaged over samples: 0 = the student reproduces the teacher."""
    diff = (student_samples - teacher_samples).flatten(1)
    return float(diff.pow(2).mean(1).sqrt().mean())


def sensitivity_profile(model: Callable[..., Any], x0: Tensor, timesteps: list[int], seed: int = 0,
                        scheduler: Any = None, **conditioning: Tensor) -> list[float]:
    """Mean ||J v||^2 over x0's samples at each training timestep (unit random v, exact jvp): how
    strongly the model amplifies a perturbation of its noisy input, the paper's FTLE-like
    diagnostic; x_t noised by ``scheduler`` (default: the reference DDPM schedule)."""
    g = seeded_generator(seed)
    profile = []
    for t in timesteps:
        noise = torch.randn(x0.shape, generator=g)
        steps = torch.full((x0.shape[0],), t)
        x_t = add_noise(x0, noise, steps, scheduler)
        v = sample_directions(x_t, generator=g)
        at = model_timesteps(steps, scheduler).float()
        profile.append(float(jacobian_sensitivity(model, x_t, at, v, mode="jvp", **conditioning).mean()))
    return profile


# --- FID and CLIP score (torchmetrics), with networks from local files -------------------------------

FID_FEATURES_HELP = ("export the FID Inception network (torch-fidelity's 'inception-v3-compat', 2048 features) to "
                     "ONNX once where torch-fidelity is installed (docs/cli.md shows the command), and give the file")
CLIP_HELP = "download a CLIP model folder where the network allows, e.g. `hf download openai/clip-vit-large-patch14 " \
            "--local-dir clip-vit-large-patch14` (safetensors weights), and give the folder"


def needs_torchmetrics() -> None:
    try:
        import torchmetrics  # noqa: F401
    except ImportError:
        raise ValueError("FID and CLIP score need torchmetrics: pip install 'nni-2ndmatch[metrics]'") from None


class OnnxFeatures(torch.nn.Module):
    """A feature network from an ONNX file, run by onnxruntime: uint8 images [N, 3, H, W] in,
    features [N, D] out (FID's Inception network resizes its input itself). No pickle is read."""

    def __init__(self, path: str) -> None:
        super().__init__()
        import onnxruntime

        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4 or inputs[0].type != "tensor(uint8)" \
                or len(outputs[0].shape) != 2:
            raise ValueError(f"{path}: the feature network must take one uint8 tensor [N, 3, H, W] and return "
                             f"[N, D] features; it takes {[(i.type, i.shape) for i in inputs]} and returns "
                             f"{outputs[0].shape}")
        self.input_name, self.path = inputs[0].name, path
        self.size = inputs[0].shape[2:]  # ints where the export fixed them
        self.num_features = outputs[0].shape[1] if isinstance(outputs[0].shape[1], int) else None

    def check_size(self, height: int, width: int) -> None:
        """A network exported for one image size refuses others (a clear error, not onnxruntime's)."""
        if any(isinstance(s, int) and s != want for s, want in zip(self.size, (height, width))):
            raise ValueError(f"{self.path}: the feature network takes {self.size[0]}x{self.size[1]} images, the "
                             f"samples are {height}x{width}; export it with dynamic H and W")

    def resolve_width(self, height: int, width: int) -> int:
        """D, as the export fixed it or, where it left it dynamic, from one call at this image size
        (torchmetrics' FID needs it before the first images)."""
        self.check_size(height, width)
        if self.num_features is None:
            self.num_features = int(self.forward(torch.zeros(1, 3, height, width, dtype=torch.uint8)).shape[1])
        return self.num_features

    def forward(self, images: Tensor) -> Tensor:
        self.check_size(*images.shape[2:])
        return torch.from_numpy(self.session.run(None, {self.input_name: images.cpu().numpy()})[0])


def to_uint8(images: Tensor) -> Tensor:
    """Images in [-1, 1] as uint8 RGB [N, 3, H, W] (greyscale repeated)."""
    images = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


class FID:
    """FID (torchmetrics' FrechetInceptionDistance) against one reference set of images in [-1, 1],
    with the feature network ``features`` (uint8 [N, 3, H, W] -> [N, D]): the reference features
    are taken once, from ``real`` batches (an iterable, so a large set need not be in memory)."""

    def __init__(self, features: torch.nn.Module, real: Any, size: tuple[int, int]) -> None:
        needs_torchmetrics()
        from torchmetrics.image.fid import FrechetInceptionDistance

        if isinstance(features, OnnxFeatures):
            features.resolve_width(*size)
        # sync_on_compute=False: under a launcher the main process alone evaluates, after the others have
        # exited, and torchmetrics would otherwise gather the metric's state from every process
        self.metric = FrechetInceptionDistance(feature=features, reset_real_features=False, input_img_size=(3, *size),
                                               sync_on_compute=False)
        for batch in real:
            self.metric.update(to_uint8(batch), real=True)

    def __call__(self, fake: Tensor, batch_size: int = 64) -> float:
        self.metric.reset()  # the generated images only
        for batch in to_uint8(fake).split(batch_size):
            self.metric.update(batch, real=False)
        return float(self.metric.compute())


def fid_score(real: Tensor, fake: Tensor, features: torch.nn.Module, batch_size: int = 64) -> float:
    """FID of two image sets in [-1, 1] (see :class:`FID`)."""
    return FID(features, real.split(batch_size), tuple(real.shape[2:]))(fake, batch_size)


def load_clip(path: str) -> tuple[Any, Any]:
    """A local CLIP model folder (transformers CLIPModel, safetensors weights) and its processor."""
    needs_torchmetrics()
    transformers = needs_transformers("the CLIP score")
    return (transformers.CLIPModel.from_pretrained(path, use_safetensors=True).eval(),
            transformers.CLIPProcessor.from_pretrained(path))


class _TensorFeatures(torch.nn.Module):
    """A CLIPModel whose get_image_features / get_text_features return tensors: transformers >= 5
    returns output objects, which torchmetrics <= 1.9's CLIPScore cannot use (fixed upstream in
    Lightning-AI/torchmetrics#3408, not released yet)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, *args: Any, **kwargs: Any) -> Tensor:
        out = self.model.get_image_features(*args, **kwargs)
        return getattr(out, "pooler_output", out)

    def get_text_features(self, *args: Any, **kwargs: Any) -> Tensor:
        out = self.model.get_text_features(*args, **kwargs)
        return getattr(out, "pooler_output", out)


def clip_score(images: Tensor, prompts: list[str], clip: tuple[Any, Any], batch_size: int = 64) -> float:
    """CLIP score (torchmetrics' CLIPScore: max(100 x the mean cosine(image, text), 0)) of images in
    [-1, 1] against their prompts."""
    needs_torchmetrics()
    from torchmetrics.multimodal.clip_score import CLIPScore

    model, processor = clip
    metric = CLIPScore(model_name_or_path=lambda: (_TensorFeatures(model), processor), sync_on_compute=False)  # see FID
    for start in range(0, len(prompts), batch_size):
        metric.update(to_uint8(images[start:start + batch_size]), prompts[start:start + batch_size])
    return float(metric.compute())
