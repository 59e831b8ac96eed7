"""Pruning surgery: channel scores (torch-pruning importances or NNI masks) -> a physically smaller
diffusers model, and its safe save format.

Which channels go is decided by scores; what else must go with them (GroupNorm groups, the
time-embedding add, skip concatenations, up/down-sampling layers, attention heads) is decided by
torch-pruning's dependency graph. Channel counts are chosen per coupled group so that every
GroupNorm group and attention head keeps the same number of channels, rounded to ``round_to``.
NNI's ModelSpeedup is not used (it cannot handle U-Nets, see DESIGN.md).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .io import atomic_dir, atomic_write_json, load_tensors, save_tensors
from .utils import requires_grad

logger = logging.getLogger(__name__)

PLAN_VERSION = 1
TP_IMPORTANCES = ("magnitude", "taylor", "diff-pruning")
#: Clean samples (and their conditioning) the gradient importances see.
CALIBRATION_SIZE = 32
#: Layers that produce the model's output keep their size.
OUTPUT_LAYERS = ("conv_out", "proj_out", "proj_out_2")

#: (torch-pruning group, {module: name} of the model being pruned) -> (a score per root channel,
#: higher = keep; the share of the group's channels to prune, <= 0 = leave the group whole)
GroupScorer = Callable[[Any, dict[nn.Module, str]], tuple[Tensor, float]]


def _fixed_layers(model: nn.Module) -> list[nn.Module]:
    """Layers whose output channels never change: the output layers, and patch embeddings (their
    fixed sin-cos position table spans the transformer's residual width)."""
    from diffusers.models.embeddings import PatchEmbed

    fixed = [m for name, m in model.named_modules() if name in OUTPUT_LAYERS]
    return fixed + [m.proj for m in model.modules() if isinstance(m, PatchEmbed)]


def _attention_heads(model: nn.Module) -> dict[nn.Module, int]:
    from diffusers.models.attention_processor import Attention

    heads = {}
    for m in model.modules():
        if isinstance(m, Attention):
            for layer in (m.to_q, m.to_k, m.to_v):
                heads[layer] = m.heads
    return heads


def _dependency_graph(model: nn.Module, example_inputs: dict[str, Any]):
    import torch_pruning as tp

    # torch-pruning silently prunes nothing where parameters do not require grad.
    with requires_grad(model, True), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)


def _groups(model: nn.Module, graph) -> list:
    """Coupled channel groups rooted at a Conv2d/Linear output that leave the fixed layers' outputs alone."""
    fixed = _fixed_layers(model)
    groups = graph.get_all_groups(ignored_layers=fixed, root_module_types=(nn.Conv2d, nn.Linear))
    return [g for g in groups
            if not any(dep.target.module in fixed and graph.is_out_channel_pruning_fn(dep.handler) for dep, _ in g)]


def _channel_groups(group, heads: dict[nn.Module, int]) -> int:
    """How many equal chunks the root's channels form: GroupNorm groups or attention heads."""
    counts = [1]
    for dep, _ in group:
        module = dep.target.module
        if isinstance(module, nn.GroupNorm):
            counts.append(module.num_groups)
        if module in heads:
            counts.append(heads[module])
    return max(counts)


def _gated_projections(model: nn.Module) -> set[nn.Module]:
    """Linear layers whose output is split in halves that multiply each other (GEGLU, SwiGLU):
    the same positions must be kept in both halves."""
    from diffusers.models import activations

    gated = tuple(getattr(activations, n) for n in ("GEGLU", "SwiGLU") if hasattr(activations, n))
    return {m.proj for m in model.modules() if isinstance(m, gated)}


def _keep_per_chunk(chunk: int, num_chunks: int, ratio: float, round_to: int | None) -> int:
    """Channels kept per chunk: nearest to (1 - ratio) * chunk, at least 1, with the total a
    multiple of round_to where some choice allows it."""
    target = (1.0 - ratio) * chunk
    choices = list(range(1, chunk + 1))
    if round_to:
        rounded = [m for m in choices if (m * num_chunks) % round_to == 0]
        choices = rounded or choices
    return min(choices, key=lambda m: (abs(m - target), -m))


def _root(group):
    dep = group[0].dep
    return dep.target.module, dep.handler


def _module_names(model: nn.Module) -> dict[nn.Module, str]:
    return {m: n for n, m in model.named_modules()}


def _out_width(module: nn.Module) -> int:
    return module.out_channels if isinstance(module, nn.Conv2d) else module.out_features


def _fix_attributes(model: nn.Module) -> None:
    """Attributes diffusers reads at run time that pruning leaves stale."""
    from diffusers.models.resnet import Downsample2D, Upsample2D

    for m in model.modules():
        if isinstance(m, (Upsample2D, Downsample2D)):
            conv = getattr(m, "conv", None)
            if isinstance(conv, nn.Conv2d):
                m.channels, m.out_channels = conv.in_channels, conv.out_channels


def magnitude_scores(group) -> Tensor:
    """L2 norm of every weight that a channel of the group touches (torch-pruning's group magnitude)."""
    import torch_pruning as tp

    return tp.importance.GroupMagnitudeImportance(p=2)(group)


def apply_plan(model: nn.Module, graph, plan: list[dict[str, Any]]) -> None:
    """Prune ``model`` in place: for each plan entry, keep the listed channels of its root layer."""
    import torch_pruning as tp

    for entry in plan:
        module = model.get_submodule(entry["root"])
        total = _out_width(module)
        keep = set(entry["keep"])
        prune = [i for i in range(total) if i not in keep]
        if not prune:
            continue
        fn = tp.prune_conv_out_channels if isinstance(module, nn.Conv2d) else tp.prune_linear_out_channels
        graph.get_pruning_group(module, fn, prune).prune()
        now = _out_width(module)
        if now != len(keep):
            raise RuntimeError(f"{entry['root']}: pruning left {now} channels, the plan keeps {len(keep)}")
    _fix_attributes(model)


def _plan(model: nn.Module, graph, scorer: GroupScorer,
          round_to: int | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    heads, gated = _attention_heads(model), _gated_projections(model)
    names = _module_names(model)
    plan, groups_report = [], []
    for group in _groups(model, graph):
        root, handler = _root(group)
        if not graph.is_out_channel_pruning_fn(handler):
            continue
        channels = _out_width(root)
        num_chunks = 2 if root in gated else _channel_groups(group, heads)
        if channels % num_chunks:
            logger.warning("%s: %d channels do not split into %d groups; left as is", names[root], channels, num_chunks)
            continue
        chunk = channels // num_chunks
        scores, ratio = scorer(group, names)
        if ratio <= 0:
            continue
        per_chunk = _keep_per_chunk(chunk, num_chunks, ratio, round_to)
        scores = scores.detach().float().view(num_chunks, chunk)
        if root in gated:  # the same positions in every chunk
            best = torch.topk(scores.sum(0), per_chunk).indices.sort().values
            keep = torch.cat([c * chunk + best for c in range(num_chunks)]).tolist()
        else:  # each chunk keeps its own best channels
            keep = torch.cat([c * chunk + torch.topk(scores[c], per_chunk).indices.sort().values
                              for c in range(num_chunks)]).tolist()
        plan.append({"root": names[root], "keep": keep})
        groups_report.append({"root": names[root], "channels": channels, "kept": len(keep),
                              "chunks": num_chunks, "asked_ratio": ratio,
                              "achieved_ratio": round(1.0 - len(keep) / channels, 4)})
    return plan, groups_report


def _macs_params(model: nn.Module, example_inputs: dict[str, Any]) -> tuple[float, int]:
    """MACs of one sample, and parameters."""
    import torch_pruning as tp

    batch = next(v.shape[0] for v in example_inputs.values() if isinstance(v, Tensor) and v.dim() > 0)
    one = {k: v[:1] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == batch else v
           for k, v in example_inputs.items()}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # it prints warnings
        warnings.simplefilter("ignore")
        macs, params = tp.utils.count_ops_and_params(model, example_inputs=one)
    return float(macs), int(params)


def _check_ratio(sparse_ratio: float) -> None:
    if isinstance(sparse_ratio, bool) or not isinstance(sparse_ratio, (int, float)) or not 0 < sparse_ratio < 1:
        raise ValueError(f"sparse_ratio={sparse_ratio!r} is not allowed; it must be in (0, 1)")


def prune_with_scores(teacher: nn.Module, scorer: GroupScorer, example_inputs: dict[str, Any],
                      round_to: int | None = 8) -> tuple[nn.Module, dict[str, Any]]:
    """A pruned copy of ``teacher`` (never modified) and a report; ``scorer`` decides, for each
    coupled group of the copy, which channels to prefer and what share to prune."""
    if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
        raise ValueError(f"round_to={round_to!r} is not allowed; it must be an integer >= 1 or None")
    student = copy.deepcopy(teacher).eval()
    before = _macs_params(student, example_inputs)
    graph = _dependency_graph(student, example_inputs)
    plan, groups = _plan(student, graph, scorer, round_to)
    apply_plan(student, graph, plan)
    student.zero_grad(set_to_none=True)  # gradient scorers attach gradients to the copy
    after = _macs_params(student, example_inputs)
    student.pruning_plan = {"version": PLAN_VERSION, "groups": plan}
    report = {"macs_before": before[0], "macs_after": after[0], "params_before": before[1],
              "params_after": after[1], "macs_ratio": after[0] / before[0],
              "params_ratio": after[1] / before[1], "groups": groups}
    off = [g for g in groups if abs(g["achieved_ratio"] - g["asked_ratio"]) > 0.05]
    if off:
        warnings.warn(f"{len(off)} of {len(groups)} layer groups got a channel ratio more than 5 points from "
                      f"the asked one (GroupNorm groups and round_to={round_to} make ratios coarse), e.g. "
                      f"{off[0]['root']}: asked {off[0]['asked_ratio']}, got {off[0]['achieved_ratio']}", stacklevel=2)
    return student, report


def _out_pruning_fns():
    import torch_pruning as tp

    return (tp.prune_conv_out_channels, tp.prune_linear_out_channels)


def _mask_keep(masks: dict[str, dict[str, Tensor]], group, names: dict[nn.Module, str]) -> tuple[Tensor, Tensor]:
    """Per root channel: how many masked layers of the group keep it, and how many masked layers
    cover it (NNI masks: {module name: {"weight": mask}}, a zero output row = a pruned channel)."""
    root, _ = _root(group)
    width = _out_width(root)
    kept, covered = torch.zeros(width), torch.zeros(width)
    out_fns = _out_pruning_fns()
    for i, (dep, idxs) in enumerate(group):
        name = names.get(dep.target.module)
        if dep.handler not in out_fns or name not in masks or "weight" not in masks[name]:
            continue
        keep = (masks[name]["weight"].detach().flatten(1).abs().sum(1) > 0).float().cpu()
        root_idxs = torch.tensor([int(r) for r in group[i].root_idxs])
        local = torch.tensor([int(j) for j in idxs])
        kept.index_add_(0, root_idxs, keep[local])
        covered.index_add_(0, root_idxs, torch.ones(len(local)))
    return kept, covered


def masks_to_student(teacher: nn.Module, masks: dict[str, dict[str, Tensor]],
                     example_inputs: dict[str, Any] | None = None,
                     round_to: int | None = 8) -> tuple[nn.Module, dict[str, Any]]:
    """A physically smaller student from the masks of any NNI pruner (``_, masks = pruner.compress()``).

    NNI decides which channels: each coupled group keeps the share of channels its masked layers
    keep, preferring the channels they keep (weight magnitude breaks ties). The dependency graph
    decides what else changes with them; GroupNorm groups, attention heads and ``round_to`` can
    move a group's count a little from the masks' (the report says by how much).
    """
    inputs = example_inputs if example_inputs is not None else default_example_inputs(teacher)

    def scorer(group, names: dict[nn.Module, str]) -> tuple[Tensor, float]:
        kept, covered = _mask_keep(masks, group, names)
        if covered.sum() == 0:  # no masked layer in the group: NNI prunes none of it
            return kept, 0.0
        magnitude = magnitude_scores(group).float().cpu()
        scores = kept / covered.clamp_min(1) + 1e-3 * magnitude / magnitude.max().clamp_min(1e-12)
        return scores, float(1.0 - kept.sum() / covered.sum())

    return prune_with_scores(teacher, scorer, inputs, round_to)


#: NNI pruner classes accepted by name (TaylorPruner gets an evaluator built from ``data``).
NNI_PRUNERS = ("L1NormPruner", "L2NormPruner", "FPGMPruner", "TaylorPruner")


def nni_masks(model: nn.Module, pruner: str, config_list: list[dict[str, Any]],
              data: Any = None, seed: int = 0) -> dict[str, dict[str, Tensor]]:
    """Masks from an NNI pruner named by its class (run on a copy; the model is not modified).

    TaylorPruner scores channels by |weight * gradient| of the denoising loss on ``data``; its
    evaluator's optimizer has lr=0, so the weights it scores are the model's own.
    """
    import nni.compression.pruning as nni_pruning

    allowed = ", ".join(NNI_PRUNERS + TP_IMPORTANCES)
    cls = getattr(nni_pruning, pruner, None)
    if not isinstance(cls, type):
        raise ValueError(f"pruner={pruner!r} is not an NNI pruner class; allowed here: {allowed}")
    if pruner not in NNI_PRUNERS:
        raise ValueError(f"pruner={pruner!r} is not supported by name; run it yourself and pass its channel masks "
                         f"to masks_to_student (allowed here: {allowed})")
    work = copy.deepcopy(model)
    if pruner == "TaylorPruner":
        import nni
        from torch.utils.data import DataLoader

        from .distill import NoisyBatches, diffusion_evaluator

        items = calibration_items(data, pruner, default_example_inputs(model))
        loader = DataLoader(items, batch_size=len(items), collate_fn=NoisyBatches(seed=seed))
        optimizer = nni.trace(torch.optim.SGD)(work.parameters(), lr=0.0)
        with requires_grad(work, True):
            nni_pruner = cls(work, config_list, diffusion_evaluator(work, loader, optimizer=optimizer),
                             training_steps=1)
            _, masks = nni_pruner.compress(None, None)  # it runs training_steps steps itself
    else:
        nni_pruner = cls(work, config_list)
        _, masks = nni_pruner.compress()
    nni_pruner.unwrap_model()
    return masks


def calibration_items(data: Any, pruner: str, example_inputs: dict[str, Any]) -> list[dict[str, Tensor]]:
    """Up to CALIBRATION_SIZE clean samples as dicts ``{"sample", **conditioning}``, from a tensor
    [N, C, H, W] or a dataset (items: tensors, or such dicts). Conditioning the data lacks comes
    from ``example_inputs`` (its first sample)."""
    if data is None:
        raise ValueError(f"pruner={pruner!r} needs data: its importance uses gradients of the denoising loss "
                         "(pass data=a tensor of clean samples or a dataset)")
    n = min(len(data), CALIBRATION_SIZE)
    if n == 0:
        raise ValueError(f"pruner={pruner!r}: data is empty")
    items = [data[i] for i in range(n)]
    items = [dict(item) if isinstance(item, dict) else {"sample": item} for item in items]
    first = next(iter(example_inputs))
    for key, value in example_inputs.items():
        if key not in (first, "timestep") and key not in items[0] and isinstance(value, Tensor):
            for item in items:
                item[key] = value[0]
    return items


def _denoising_gradients(teacher: nn.Module, pruner: str, data: Any, example_inputs: dict[str, Any], seed: int,
                         threshold: float, num_timesteps: int) -> tuple[dict[str, Tensor], list[int]]:
    """Gradients of the denoising loss w.r.t. every parameter, by name (on a copy of the teacher),
    and the timesteps they were summed over (for ``taylor``: random, one per sample).

    ``taylor``: one batch of data at random timesteps. ``diff-pruning``: summed over timesteps
    0..T-1 (``num_timesteps`` evenly spaced, in that order) until the loss falls below
    ``threshold`` times the largest loss seen, as in Diff-Pruning (Fang et al., 2023).
    """
    from .finetuners import default_scheduler
    from .losses import model_output, squared_norm
    from .training import collate

    x0, conditioning = collate(calibration_items(data, pruner, example_inputs), torch.device("cpu"))
    scheduler = default_scheduler()
    steps = int(scheduler.config.num_train_timesteps)
    g = torch.Generator().manual_seed(seed)
    work = copy.deepcopy(teacher).eval()

    def loss_at(t: Tensor) -> Tensor:
        noise = torch.randn(x0.shape, generator=g)
        x_t = scheduler.add_noise(x0, noise, t)
        return squared_norm(model_output(work, x_t, t.float(), **conditioning) - noise).mean()

    used: list[int] = []
    with requires_grad(work, True):
        if pruner == "taylor":
            t = torch.randint(0, steps, (x0.shape[0],), generator=g)
            loss_at(t).backward()
            used = t.tolist()
        else:
            largest = 0.0
            for t in torch.linspace(0, steps - 1, num_timesteps).round().long().tolist():
                loss = loss_at(torch.full((x0.shape[0],), t))
                value = float(loss.detach())
                largest = max(largest, value)
                if value < threshold * largest:
                    break
                loss.backward()
                used.append(t)
    return {name: p.grad for name, p in work.named_parameters() if p.grad is not None}, used


def taylor_scorer(gradients: dict[str, Tensor], sparse_ratio: float) -> GroupScorer:
    """First-order Taylor scores |w * dL/dw| (torch-pruning's group Taylor importance), from
    gradients computed on a copy of the model, looked up by parameter name."""
    import torch_pruning as tp

    importance = tp.importance.GroupTaylorImportance()

    def scorer(group, names: dict[nn.Module, str]) -> tuple[Tensor, float]:
        for dep, _ in group:
            module = dep.target.module
            for pname, p in module.named_parameters(recurse=False):
                if p.grad is None:
                    p.grad = gradients.get(f"{names[module]}.{pname}", torch.zeros_like(p)).clone()
        return importance(group), sparse_ratio

    return scorer


def default_config_list(model: nn.Module, sparse_ratio: float) -> list[dict[str, Any]]:
    """NNI config_list: every Conv2d and Linear at ``sparse_ratio``, the output layers excluded."""
    exclude = [name for name, _ in model.named_modules() if name in OUTPUT_LAYERS]
    return [{"op_types": ["Conv2d", "Linear"], "sparse_ratio": sparse_ratio, "exclude_op_names": exclude}]


def prune_diffusers(teacher: nn.Module, pruner: str = "magnitude", sparse_ratio: float = 0.3, *,
                    example_inputs: dict[str, Any], data: Any = None, round_to: int | None = 8,
                    config_list: list[dict[str, Any]] | None = None, seed: int = 0,
                    diff_threshold: float = 0.05, diff_timesteps: int = 20) -> tuple[nn.Module, dict[str, Any]]:
    """Prune a diffusers model into a physically smaller student; the teacher is not modified.

    ``pruner``: a torch-pruning importance (``magnitude``, ``taylor``, ``diff-pruning``) or an NNI
    pruner class name (L1NormPruner, L2NormPruner, FPGMPruner, TaylorPruner), which gets
    ``config_list`` (default: every Conv2d and Linear at ``sparse_ratio``, output layers excluded).
    ``data`` (clean samples: a tensor or a dataset) is needed by the gradient importances only;
    ``diff_threshold`` and ``diff_timesteps`` tune ``diff-pruning`` (see ``_denoising_gradients``).
    Deterministic for a ``seed``.
    """
    _check_ratio(sparse_ratio)
    if not 0 <= diff_threshold < 1:
        raise ValueError(f"diff_threshold={diff_threshold!r} is not allowed; it must be in [0, 1)")
    if isinstance(diff_timesteps, bool) or not isinstance(diff_timesteps, int) or diff_timesteps < 1:
        raise ValueError(f"diff_timesteps={diff_timesteps!r} is not allowed; it must be an integer >= 1")
    if pruner == "magnitude":
        return prune_with_scores(teacher, lambda group, names: (magnitude_scores(group), sparse_ratio),
                                 example_inputs, round_to)
    if pruner in ("taylor", "diff-pruning"):
        gradients, timesteps = _denoising_gradients(teacher, pruner, data, example_inputs, seed, diff_threshold,
                                                    diff_timesteps)
        student, report = prune_with_scores(teacher, taylor_scorer(gradients, sparse_ratio), example_inputs, round_to)
        report["calibration_timesteps"] = timesteps
        return student, report
    masks = nni_masks(teacher, pruner, config_list or default_config_list(teacher, sparse_ratio), data, seed)
    return masks_to_student(teacher, masks, example_inputs, round_to)


# --- save format -------------------------------------------------------------------------------

WEIGHTS_FILE, CONFIG_FILE, PLAN_FILE = "model.safetensors", "config.json", "pruning_plan.json"


def save_pruned(student: nn.Module, folder: str | os.PathLike) -> None:
    """Write a pruned student: safetensors weights, the DENSE model's diffusers config (config.json)
    and the pruning plan (JSON: the channels each group keeps). Written atomically."""
    plan = getattr(student, "pruning_plan", None)
    if plan is None:
        raise ValueError("the model has no pruning_plan; save it with save_pretrained instead")
    config = dict(student.config)
    config["_class_name"] = type(student).__name__
    with atomic_dir(folder) as tmp:
        save_tensors(tmp / WEIGHTS_FILE, student.state_dict())
        atomic_write_json(tmp / CONFIG_FILE, json.loads(json.dumps(config, default=list)))
        atomic_write_json(tmp / PLAN_FILE, plan)


def is_pruned_folder(folder: str | os.PathLike) -> bool:
    return (Path(folder) / PLAN_FILE).is_file()


def load_model_folder(folder: str | os.PathLike) -> nn.Module:
    """A pruned-student folder or a diffusers model folder, told apart by the pruning plan file."""
    if is_pruned_folder(folder):
        return load_pruned(folder)
    from .models import load_diffusers_model

    return load_diffusers_model(folder)


def load_pruned(folder: str | os.PathLike, example_inputs: dict[str, Any] | None = None) -> nn.Module:
    """Rebuild the dense architecture from its config, apply the plan, load the weights (strict)."""
    from .models import SUPPORTED_CLASSES

    folder = Path(folder)
    for name in (WEIGHTS_FILE, CONFIG_FILE, PLAN_FILE):
        if not (folder / name).is_file():
            raise ValueError(f"{str(folder)!r} is not a pruned-student folder: {name} is missing")
    config = json.loads((folder / CONFIG_FILE).read_text())
    plan = json.loads((folder / PLAN_FILE).read_text())
    class_name = config.get("_class_name")
    if class_name not in SUPPORTED_CLASSES:
        raise ValueError(f"{folder / CONFIG_FILE}: _class_name={class_name!r} is not supported; "
                         f"allowed: {', '.join(SUPPORTED_CLASSES)}")
    if plan.get("version") != PLAN_VERSION:
        raise ValueError(f"{folder / PLAN_FILE}: version={plan.get('version')!r} is not supported; allowed: {PLAN_VERSION}")
    import diffusers

    cls = getattr(diffusers, class_name)
    model = cls.from_config({k: v for k, v in config.items() if not k.startswith("_")}).eval()
    inputs = example_inputs if example_inputs is not None else default_example_inputs(model)
    try:
        apply_plan(model, _dependency_graph(model, inputs), plan["groups"])
    except (KeyError, AttributeError, IndexError, RuntimeError) as e:
        raise ValueError(f"{folder / PLAN_FILE} does not match the {class_name} architecture: {e}") from None
    model.pruning_plan = plan
    model.load_state_dict(load_tensors(folder / WEIGHTS_FILE), strict=True)
    return model


def default_example_inputs(model: nn.Module, batch: int = 1) -> dict[str, Any]:
    """Forward arguments of the right shapes for a diffusers model, built from its config."""
    cfg = model.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    first = "hidden_states" if type(model).__name__ == "DiTTransformer2DModel" else "sample"
    inputs: dict[str, Any] = {first: torch.randn(batch, cfg.in_channels, size, size),
                              "timestep": torch.ones(batch)}
    if getattr(cfg, "cross_attention_dim", None):
        dim = cfg.cross_attention_dim
        inputs["encoder_hidden_states"] = torch.randn(batch, 4, dim if isinstance(dim, int) else dim[0])
    if type(model).__name__ == "DiTTransformer2DModel":
        inputs["class_labels"] = torch.zeros(batch, dtype=torch.long)
    return inputs
