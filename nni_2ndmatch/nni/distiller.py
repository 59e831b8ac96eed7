"""2ndMatch and KD as NNI distillers, for users who drive compression with NNI's own API.

    evaluator = diffusion_evaluator(student, DataLoader(dataset, batch_size=16, collate_fn=NoisyBatches()))
    pruner = TaylorPruner(student, config_list, evaluator, training_steps=20)
    distiller = SecondMatchDistiller.from_compressor(pruner, [], teacher_model=teacher, lambda_jac=0.1)
    distiller.compress(max_steps=1000, max_epochs=None)
    masks = pruner.get_masks()
    distiller.unwrap_model()          # then masks_to_student(student, masks) for a physical student

The training step of the evaluator returns the denoising (DSM) loss; the distiller adds the
strategy's teacher terms (``kd``, and ``jac`` for 2ndmatch) and the layer-wise targets of its
``config_list`` (NNI's DynamicLayerwiseDistiller semantics). NNI's loss patch sees only
``(loss, batch)``, so each batch carries what the terms need: the noised input ``x_t``, the
``timesteps``, the ``noise`` and the model's conditioning (``NoisyBatches`` builds such batches).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from ..data import collate
from ..finetuners import finetuner_class, get_finetuner
from ..method import default_scheduler, dsm_term, model_output, require_epsilon, require_scheduler, sample_timesteps
from ..scoped import seeded_generator
from ..utils import did_you_mean

logger = logging.getLogger(__name__)

BATCH_KEYS = ("x_t", "timesteps", "noise")


class NoisyBatches:
    """A DataLoader ``collate_fn``: stack clean items (tensors, or dicts with the image under
    "sample" and conditioning under its keyword names) and noise them with the DDPM scheduler.

    Returns ``{"x_t", "timesteps", "noise", **conditioning}``. Timesteps and noise come from a
    generator seeded with ``seed``, so the batches are reproducible (use ``num_workers=0``).
    """

    def __init__(self, scheduler: Any = None, seed: int = 0, antithetic: bool = False) -> None:
        self.scheduler = scheduler if scheduler is not None else default_scheduler()
        require_scheduler(self.scheduler)
        require_epsilon(self.scheduler, "noised batches (NoisyBatches: the distiller's, and the gradient pruners' "
                        "calibration) need a noise-predicting network (the DSM step regresses the noise)")
        self.antithetic = antithetic
        self.generator = seeded_generator(seed)

    def __call__(self, items: list[Any]) -> dict[str, Tensor]:
        x0, conditioning = collate(items, torch.device("cpu"))
        t = sample_timesteps(x0.shape[0], int(self.scheduler.config.num_train_timesteps), self.antithetic,
                             self.generator)
        noise = torch.randn(x0.shape, generator=self.generator, dtype=x0.dtype)
        return {"x_t": self.scheduler.add_noise(x0, noise, t), "timesteps": t, "noise": noise, **conditioning}


def _split(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise KeyError(f"the batch has no {', '.join(missing)}; a diffusion batch needs {', '.join(BATCH_KEYS)} "
                       "(build it with NoisyBatches as the DataLoader's collate_fn)")
    return batch["x_t"], batch["timesteps"], batch["noise"], {k: v for k, v in batch.items() if k not in BATCH_KEYS}


def dsm_training_step(batch: dict[str, Tensor], model: nn.Module) -> Tensor:
    """The evaluator's training step: ||eps_S(x_t, t) - noise||^2 (sum over pixels, mean over batch)."""
    x_t, t, noise, conditioning = _split(batch)
    return dsm_term(model_output(model, x_t, t, **conditioning), noise)


def teacher_forward(batch: dict[str, Tensor], teacher: nn.Module) -> Tensor:
    """The default ``teacher_predict``: the teacher's noise prediction on the batch."""
    x_t, t, _, conditioning = _split(batch)
    return model_output(teacher, x_t, t, **conditioning)


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, dict):
        return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
    return batch.to(device) if isinstance(batch, Tensor) else batch


def diffusion_evaluator(model: nn.Module, dataloader: Iterable[dict[str, Tensor]], *, lr: float = 1e-4,
                        weight_decay: float = 0.0, optimizer: Any = None,
                        training_step: Callable[..., Tensor] = dsm_training_step, progress: bool = True) -> Any:
    """An NNI ``TorchEvaluator`` that trains ``model`` on ``dataloader`` (batches from
    ``NoisyBatches``) with ``training_step`` (DSM by default) and AdamW traced by ``nni.trace`` (NNI
    rebuilds the optimizer for the wrapped model, so it must be traced; pass your own the same way).

    The loop stops at ``max_steps`` optimizer steps or ``max_epochs`` passes, whichever comes first,
    or after one pass when neither is given; batches follow the model's device; an empty loader is
    a ValueError. ``progress``: a progress bar with the loss.
    """
    import nni
    from nni.compression import TorchEvaluator

    def training_func(model, optimizers, step_fn, lr_schedulers=None, max_steps=None, max_epochs=None):
        optimizers = optimizers if isinstance(optimizers, (list, tuple)) else [optimizers]
        schedulers = lr_schedulers if isinstance(lr_schedulers, (list, tuple)) else [lr_schedulers]
        from tqdm.auto import tqdm

        device = next(model.parameters()).device
        model.train()
        steps = epochs = 0
        total = max_steps
        if total is None and hasattr(dataloader, "__len__"):
            total = (max_epochs or 1) * len(dataloader)
        bar = tqdm(total=total, desc="nni training", dynamic_ncols=True, disable=not progress)
        while True:
            batches = 0
            for batch in dataloader:
                batches += 1
                loss = step_fn(_to(batch, device), model)
                for opt in optimizers:
                    opt.zero_grad()
                loss.backward()
                for opt in optimizers:
                    opt.step()
                for scheduler in schedulers:
                    if scheduler is not None:
                        scheduler.step()
                steps += 1
                bar.update(1)
                if progress:  # reading the loss waits for the device
                    bar.set_postfix(loss=f"{loss.item():.4g}", refresh=False)
                if max_steps is not None and steps >= max_steps:
                    bar.close()
                    return
            epochs += 1
            if not batches:
                bar.close()
                raise ValueError("the evaluator's dataloader gave no batch; give it data")
            # NNI's contract: stop at whichever of max_steps and max_epochs comes first (one epoch without either)
            if (max_epochs is not None and epochs >= max_epochs) or (max_steps is None and max_epochs is None):
                bar.close()
                return

    if optimizer is None:
        optimizer = nni.trace(torch.optim.AdamW)(model.parameters(), lr=lr, weight_decay=weight_decay)
    return TorchEvaluator(training_func, optimizer, training_step)


def _make_distiller_class() -> type:
    from nni.compression.distillation import DynamicLayerwiseDistiller

    class SecondMatchDistiller(DynamicLayerwiseDistiller):  # type: ignore[misc, valid-type]
        __doc__ = _DOC

        def __init__(self, model: nn.Module, config_list: list[dict], evaluator: Any, teacher_model: nn.Module,
                     teacher_predict: Callable[[Any, nn.Module], Any] = teacher_forward,
                     origin_loss_lambda: float = 1.0, existed_wrappers: dict | None = None, *,
                     finetuner: str = "2ndmatch", scheduler: Any = None, **options: Any) -> None:
            if not isinstance(teacher_model, nn.Module):
                raise ValueError(f"teacher_model={type(teacher_model).__name__}: the distiller needs the dense "
                                 "teacher, an nn.Module")
            if isinstance(origin_loss_lambda, bool) or not (isinstance(origin_loss_lambda, (int, float))
                                                            and 0 <= origin_loss_lambda < float("inf")):
                raise ValueError(f"origin_loss_lambda={origin_loss_lambda!r} is not allowed; it must be a number >= 0 "
                                 "(the weight of the evaluator's loss, DSM)")
            self.strategy = _strategy(finetuner, options, scheduler)
            self.last_terms: dict[str, float] = {}
            self.steps = 0  # loss patches so far: the strategy's step (jac_every)
            self._layerwise = bool(config_list)
            teacher_model.eval()  # its dropout off: the targets and the Jacobian term are deterministic
            super().__init__(model, config_list, evaluator, teacher_model, teacher_predict,
                             origin_loss_lambda=origin_loss_lambda, existed_wrappers=existed_wrappers)

        @classmethod
        def from_compressor(cls, compressor: Any, new_config_list: list[dict], teacher_model: nn.Module,
                            teacher_predict: Callable[[Any, nn.Module], Any] = teacher_forward,
                            origin_loss_lambda: float = 1.0, evaluator: Any = None, *,
                            finetuner: str = "2ndmatch", scheduler: Any = None, **options: Any) -> Any:
            """Fuse with ``compressor`` (e.g. a pruner): its model, wrappers and evaluator are shared."""
            from nni.compression.base.compressor import Compressor

            return Compressor.from_compressor.__func__(
                cls, compressor, new_config_list, evaluator=evaluator, teacher_model=teacher_model,
                teacher_predict=teacher_predict, origin_loss_lambda=origin_loss_lambda, finetuner=finetuner,
                scheduler=scheduler, **options)

        def compress(self, max_steps: int | None, max_epochs: int | None) -> Any:
            """NNI's compress; refuses a ``max_steps`` in which none of ``jac_every``'s term steps
            falls, and logs a warning when a run that epochs limited ended without one."""
            every, before = getattr(self.strategy.opts, "jac_every", 1), self.steps
            if every > 1 and max_steps is not None and (before + max_steps) // every == before // every:
                why = f"allowed: 1 to {max_steps}" if before == 0 else \
                    f"its term steps are multiples of {every}, this call's are {before + 1} to {before + max_steps}"
                raise ValueError(f"jac_every={every} is not allowed with compress(max_steps={max_steps}): no step "
                                 f"would compute the Jacobian term; {why}")
            model = super().compress(max_steps, max_epochs)
            if self.steps > before and self.steps // every == before // every:
                logger.warning(f"jac_every={every}: none of this compress()'s {self.steps - before} steps computed the "
                               f"Jacobian term (it runs on every {every}th step); give more steps or a smaller "
                               "jac_every")
            return model

        def _register_loss_patch(self, evaluator: Any) -> None:
            def loss_patch(original_loss: Tensor, batch: dict[str, Tensor]) -> Tensor:
                total = self.origin_loss_lambda * original_loss
                if self._layerwise:
                    with torch.no_grad():
                        self.teacher_predict(batch, self.teacher_model)
                    total = total + self.compute_distill_loss()
                x_t, t, noise, conditioning = _split(batch)
                self.strategy.step = self.steps
                self.steps += 1
                terms = self.strategy.terms(self.bound_model, self.teacher_model, x_t, noise, t, **conditioning)
                self._clean_targets()  # the Jacobian passes recorded hidden states: not for the next step
                for name, weight in self.strategy.weights().items():
                    # the evaluator's own loss plays the DSM role; jac_every leaves jac out between its steps
                    if name != "dsm" and name in terms:
                        total = total + weight * terms[name]
                self.last_terms = {name: float(value.detach()) for name, value in terms.items()}
                self.last_terms["loss"] = float(total.detach())
                return total

            evaluator.patch_loss(loss_patch)

        def _clean_targets(self) -> None:
            for spaces in (self._target_spaces, self._teacher_target_spaces):
                for targets in spaces.values():
                    for target in targets.values():
                        target.clean()

    SecondMatchDistiller.__module__ = __name__
    SecondMatchDistiller.__qualname__ = "SecondMatchDistiller"
    return SecondMatchDistiller


def _strategy(name: str, options: dict[str, Any], scheduler: Any = None) -> Any:
    cls = finetuner_class(name)
    if not cls.uses_teacher:
        raise ValueError(f"finetuner={name!r} uses no teacher, so it is no distiller; allowed: a strategy with a "
                         "teacher such as 'kd' or '2ndmatch' (train with the evaluator alone for plain DSM)")
    if "lambda_dsm" in options:
        raise ValueError("lambda_dsm is not an option of the distiller: the evaluator's loss is the DSM term, "
                         "weighted by origin_loss_lambda")
    allowed = [key for key in cls.Options.model_fields if key != "lambda_dsm"]
    unknown = [key for key in options if key not in allowed]
    if unknown:
        raise ValueError(f"finetuner {name!r} has no option {unknown[0]!r}{did_you_mean(unknown[0], allowed)} "
                         f"(allowed: {', '.join(allowed)})")
    if scheduler is not None:  # its terms take the batches' noise as the target and t as the network's timestep
        require_scheduler(scheduler)
        require_epsilon(scheduler, "the distiller trains on NoisyBatches' batches, which need a noise-predicting "
                        "network (the target of its terms is the noise they add)")
    return get_finetuner(name, scheduler=scheduler, **options)


_DOC = """2ndMatch (or any teacher-based strategy, e.g. ``finetuner="kd"``) as an NNI distiller.

    A subclass of NNI's ``DynamicLayerwiseDistiller``: works with ``TorchEvaluator`` and fuses with
    NNI pruners through ``from_compressor``; layer-wise targets in ``config_list`` (``lambda``,
    ``link``, ``apply_method``) keep working beside the strategy's terms. The loss of one step is
    ``origin_loss_lambda * evaluator_loss + layer-wise + lambda_kd * kd + lambda_jac * jac``; the
    terms of the last step are in ``last_terms``. ``options`` are the strategy's own (``lambda_kd``,
    ``lambda_jac``, ``mode``, ``num_projections``, ``jac_fraction``, ``jac_every``, ...; kd's
    ``kd_perturb``); each loss patch is one step (``jac_every`` counts them); ``config_list`` may be
    empty. Batches must carry ``x_t``, ``timesteps``, ``noise`` (see ``NoisyBatches``);
    ``scheduler``: the schedule they were noised by, the one given to ``NoisyBatches`` (default:
    the reference DDPM one; one whose network predicts the noise, not v_prediction or flow
    matching), which the strategy's weightings and ``kd_perturb`` read. The teacher
    is put in eval mode.
    """


_CLASS: type | None = None


def distiller_class() -> type:
    """The SecondMatchDistiller class (built on first use: it imports NNI)."""
    global _CLASS
    if _CLASS is None:
        _CLASS = _make_distiller_class()
    return _CLASS


def __getattr__(name: str) -> Any:
    if name == "SecondMatchDistiller":
        return distiller_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
