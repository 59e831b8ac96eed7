"""Pruning surgery: channel scores (torch-pruning importances or NNI masks) -> a physically smaller
diffusers model, and its safe save format.

Which channels go is decided by scores; what else must go with them (GroupNorm groups, the
time-embedding add, skip concatenations, up/down-sampling layers, attention heads) is decided by
torch-pruning's dependency graph. Channel counts are chosen per coupled group so that every
GroupNorm group and attention head keeps the same number of channels, rounded to ``round_to``.
NNI's ModelSpeedup is not used (it cannot handle U-Nets: GroupNorm groups, the time-embedding add
and attention heads defeat it; see docs/pruning.md).
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import io
import json
import logging
import os
import re
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


# --- NNI config_list checks --------------------------------------------------------------------

#: Keys of an NNI 3.0 pruning config_list entry that choose its layers (nni/compression/base/config.py).
SELECT_KEYS = ("op_types", "op_names", "op_names_re", "exclude_op_types", "exclude_op_names", "exclude_op_names_re")
#: Keys of a pruning setting, in an entry or in its ``target_settings``. NNI's internal_metric_block,
#: apply_method and align are not accepted: the student is cut by whole output channels of the weight masks.
SETTING_KEYS = ("sparse_ratio", "sparse_threshold", "max_sparse_ratio", "min_sparse_ratio", "global_group_id",
                "dependency_group_id", "granularity")
CONFIG_LIST_KEYS = SELECT_KEYS + ("target_names", "target_settings") + SETTING_KEYS
#: NNI's pre-3.0 keys and what replaces them.
LEGACY_KEYS = {"sparsity": "sparse_ratio", "sparsity_per_layer": "sparse_ratio",
               "total_sparsity": "sparse_ratio with global_group_id", "max_sparsity_per_layer": "max_sparse_ratio",
               "op_partial_names": "op_names_re", "exclude": "exclude_op_types or exclude_op_names"}
#: Granularities that remove whole output channels (what a physically smaller student is made from).
GRANULARITIES = ("default", "out_channel")
#: Ratio keys: (low, high, low allowed, high allowed); max/min follow NNI's own ranges.
RATIO_RANGES = {"sparse_ratio": (0, 1, False, False), "max_sparse_ratio": (0, 1, False, True),
                "min_sparse_ratio": (0, 1, True, False)}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _json_kind(value: Any) -> str:
    """What a JSON value is, in JSON's words."""
    if isinstance(value, bool):
        return "a boolean"
    kinds = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
             type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def _yaml_kind(value: Any) -> str:
    return "a mapping" if isinstance(value, dict) else _json_kind(value)


def _did_you_mean(value: str, choices: list[str], n: int = 1) -> str:
    close = difflib.get_close_matches(value, choices, n=n)
    return f"; did you mean {' or '.join(map(repr, close))}?" if close else ""


def _unknown_key(key: Any, allowed: tuple[str, ...], where: str) -> str:
    if key in LEGACY_KEYS:
        return f"{where}.{key}: {key!r} is a pre-3.0 NNI key; use {LEGACY_KEYS[key]}"
    hint = _did_you_mean(key, list(allowed)) if isinstance(key, str) else ""
    return f"{where}.{key}: unknown key{hint} (allowed: {', '.join(allowed)})"


def _ratio_problem(key: str, value: Any, where: str) -> str | None:
    low, high, low_ok, high_ok = RATIO_RANGES[key]
    if _is_number(value) and (low <= value if low_ok else low < value) and (value <= high if high_ok else value < high):
        return None
    interval = f"{'[' if low_ok else '('}{low}, {high}{']' if high_ok else ')'}"
    return f"{where}.{key}: value {value!r} is not allowed: it must be in {interval}"


def _setting_problems(setting: dict[str, Any], where: str) -> list[str]:
    """Problems of one pruning setting: ratios in range, one of sparse_ratio/sparse_threshold, typed ids."""
    problems = [p for key in RATIO_RANGES if key in setting
                for p in [_ratio_problem(key, setting[key], where)] if p]
    if "sparse_ratio" in setting and "sparse_threshold" in setting:
        problems.append(f"{where}: give sparse_ratio or sparse_threshold, not both")
    threshold = setting.get("sparse_threshold")
    if "sparse_threshold" in setting and not (_is_number(threshold) and threshold > 0):
        problems.append(f"{where}.sparse_threshold: value {threshold!r} is not allowed: it must be a number > 0")
    low, high = setting.get("min_sparse_ratio"), setting.get("max_sparse_ratio")
    if _is_number(low) and _is_number(high) and low > high:
        problems.append(f"{where}: min_sparse_ratio={low!r} is above max_sparse_ratio={high!r}")
    for key in ("global_group_id", "dependency_group_id"):
        value = setting.get(key)
        if key in setting and (isinstance(value, bool) or not isinstance(value, (int, str))):
            problems.append(f"{where}.{key}: value {value!r} is not allowed: it must be an integer or a string")
    granularity = setting.get("granularity", "default")
    if not isinstance(granularity, str) or granularity not in GRANULARITIES:
        problems.append(f"{where}.granularity: value {granularity!r} is not allowed: the student is cut by whole "
                        f"output channels; allowed: {', '.join(GRANULARITIES)}")
    return problems


def _string_list_problems(entry: dict[str, Any], where: str) -> list[str]:
    """Layer selectors and target_names are lists of strings; the ``_re`` ones valid regular expressions."""
    problems = []
    for key in SELECT_KEYS + ("target_names",):
        value = entry.get(key)
        if key not in entry:
            continue
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            problems.append(f"{where}.{key}: value {value!r} is not allowed: it must be a list of strings")
            continue
        for j, pattern in enumerate(value if key.endswith("_re") else []):
            try:
                re.compile(pattern)
            except re.error as e:
                problems.append(f"{where}.{key}[{j}]: value {pattern!r} is not a regular expression: {e}")
        if key == "target_names" and "weight" not in value:
            problems.append(f"{where}.target_names: value {value!r} is not allowed: it must include 'weight' "
                            "(the student is cut where the weight masks prune)")
    return problems


def _target_settings_problems(value: Any, where: str) -> list[str]:
    if not isinstance(value, dict):
        return [f"{where}: expected a mapping {{target name: setting}}, got {_yaml_kind(value)}"]
    problems = []
    for name, setting in value.items():
        at = f"{where}.{name}"
        if not isinstance(setting, dict):
            problems.append(f"{at}: expected a mapping of settings ({', '.join(SETTING_KEYS)}), "
                            f"got {_yaml_kind(setting)}")
            continue
        problems += [_unknown_key(k, SETTING_KEYS, at) for k in setting if k not in SETTING_KEYS]
        problems += _setting_problems(setting, at)
    return problems


def _sets_sparsity(entry: dict[str, Any]) -> bool:
    targets = entry.get("target_settings")
    settings = [entry, *(targets.values() if isinstance(targets, dict) else [])]
    return any(isinstance(s, dict) and ("sparse_ratio" in s or "sparse_threshold" in s) for s in settings)


def _entry_problems(entry: Any, where: str) -> list[str]:
    if not isinstance(entry, dict):
        return [f"{where}: expected a mapping (op_types, sparse_ratio, ...), got {_yaml_kind(entry)}"]
    problems = [_unknown_key(k, CONFIG_LIST_KEYS, where) for k in entry if k not in CONFIG_LIST_KEYS]
    if not any(k in entry for k in ("op_types", "op_names", "op_names_re")):
        problems.append(f"{where}: give op_types, op_names or op_names_re (the layers the entry prunes)")
    if not _sets_sparsity(entry):
        problems.append(f"{where}: give sparse_ratio or sparse_threshold (in the entry or its target_settings); "
                        "without either the entry prunes nothing")
    problems += _string_list_problems(entry, where)
    problems += _setting_problems(entry, where)
    if "target_settings" in entry:
        problems += _target_settings_problems(entry["target_settings"], f"{where}.target_settings")
    return problems


def config_list_problems(config_list: Any) -> list[str]:
    """Every problem of an NNI pruning config_list, one line each, naming the entry and key."""
    if not isinstance(config_list, list):
        return [f"config_list: expected a list of mappings, got {_yaml_kind(config_list)}"]
    if not config_list:
        return ["config_list: the list is empty, so nothing would be pruned; leave config_list out for the "
                "default (every Conv2d and Linear at sparse_ratio)"]
    return [p for i, entry in enumerate(config_list) for p in _entry_problems(entry, f"config_list[{i}]")]


def check_config_list(config_list: Any) -> None:
    """A ValueError listing every problem of an NNI pruning config_list."""
    problems = config_list_problems(config_list)
    if problems:
        raise ValueError("\n".join(problems))


def _selector_problems(entry: dict[str, Any], where: str, names: list[str], types: list[str],
                       model_name: str) -> list[str]:
    problems = []
    for key in ("op_types", "exclude_op_types"):
        for value in entry.get(key, []):
            if value not in types:
                problems.append(f"{where}.{key}: {value!r} is not a layer type of this {model_name}"
                                f"{_did_you_mean(value, types)} (types present: {', '.join(types)})")
    for key in ("op_names", "exclude_op_names"):
        for value in entry.get(key, []):
            if value not in names:
                hint = _did_you_mean(value, names, n=3) or f"; module names are like {names[-1]!r}"
                problems.append(f"{where}.{key}: {value!r} is not a module of this {model_name}{hint}")
    for pattern in entry.get("op_names_re", []):
        if not any(re.match(pattern, name) for name in names):
            problems.append(f"{where}.op_names_re: {pattern!r} matches no module name of this {model_name}")
    return problems


def check_config_list_model(config_list: list[dict[str, Any]], model: nn.Module) -> None:
    """The layer types and names a (well-formed) config_list names exist in ``model``: a ValueError if not."""
    names = [name for name, _ in model.named_modules() if name]
    types = sorted({type(m).__name__ for m in model.modules()})
    problems = [p for i, entry in enumerate(config_list)
                for p in _selector_problems(entry, f"config_list[{i}]", names, types, type(model).__name__)]
    if problems:
        raise ValueError("\n".join(problems))


def _float_thresholds(config_list: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A copy where integer sparse_threshold values are floats (NNI's schema accepts floats only)."""
    config_list = copy.deepcopy(config_list)
    for entry in config_list:
        for setting in [entry, *(entry.get("target_settings") or {}).values()]:
            if _is_number(setting.get("sparse_threshold")):
                setting["sparse_threshold"] = float(setting["sparse_threshold"])
    return config_list


def check_config_list_pruner(pruner: str, config_list: Any) -> None:
    """A config_list goes with an NNI pruner only: the torch-pruning importances would ignore it."""
    if config_list is not None and pruner in TP_IMPORTANCES:
        raise ValueError(f"config_list is for the NNI pruners ({', '.join(NNI_PRUNERS)}); pruner={pruner!r} "
                         "(a torch-pruning importance) would ignore it: leave config_list out or pick an NNI pruner")


def _check_config_list_use(pruner: str, config_list: Any, model: nn.Module) -> None:
    check_config_list_pruner(pruner, config_list)
    if config_list is None:
        return
    check_config_list(config_list)
    check_config_list_model(config_list, model)


def prune_diffusers(teacher: nn.Module, pruner: str = "magnitude", sparse_ratio: float = 0.3, *,
                    example_inputs: dict[str, Any] | None = None, data: Any = None, round_to: int | None = 8,
                    config_list: list[dict[str, Any]] | None = None, seed: int = 0,
                    diff_threshold: float = 0.05, diff_timesteps: int = 20) -> tuple[nn.Module, dict[str, Any]]:
    """Prune a diffusers model into a physically smaller student; the teacher is not modified.

    ``pruner``: a torch-pruning importance (``magnitude``, ``taylor``, ``diff-pruning``) or an NNI
    pruner class name (L1NormPruner, L2NormPruner, FPGMPruner, TaylorPruner), which gets
    ``config_list`` (default: every Conv2d and Linear at ``sparse_ratio``, output layers excluded;
    a given one replaces ``sparse_ratio`` and is checked against the model first).
    ``data`` (clean samples: a tensor or a dataset) is needed by the gradient importances only;
    ``diff_threshold`` and ``diff_timesteps`` tune ``diff-pruning`` (see ``_denoising_gradients``).
    ``example_inputs``: the model's forward arguments for tracing (default: ``default_example_inputs``).
    Deterministic for a ``seed``. The report records what was asked: ``pruner``, ``sparse_ratio``
    (None when a ``config_list`` decides) and ``config_list`` (None when not given).
    """
    _check_ratio(sparse_ratio)
    if example_inputs is None:
        example_inputs = default_example_inputs(teacher)
    if not 0 <= diff_threshold < 1:
        raise ValueError(f"diff_threshold={diff_threshold!r} is not allowed; it must be in [0, 1)")
    if isinstance(diff_timesteps, bool) or not isinstance(diff_timesteps, int) or diff_timesteps < 1:
        raise ValueError(f"diff_timesteps={diff_timesteps!r} is not allowed; it must be an integer >= 1")
    _check_config_list_use(pruner, config_list, teacher)
    student, report = _run_pruner(teacher, pruner, sparse_ratio, example_inputs, data, round_to, config_list, seed,
                                  diff_threshold, diff_timesteps)
    report.update(pruner=pruner, sparse_ratio=None if config_list is not None else sparse_ratio,
                  config_list=copy.deepcopy(config_list))
    return student, report


def _run_pruner(teacher: nn.Module, pruner: str, sparse_ratio: float, example_inputs: dict[str, Any], data: Any,
                round_to: int | None, config_list: list[dict[str, Any]] | None, seed: int, diff_threshold: float,
                diff_timesteps: int) -> tuple[nn.Module, dict[str, Any]]:
    if pruner == "magnitude":
        return prune_with_scores(teacher, lambda group, names: (magnitude_scores(group), sparse_ratio),
                                 example_inputs, round_to)
    if pruner in ("taylor", "diff-pruning"):
        gradients, timesteps = _denoising_gradients(teacher, pruner, data, example_inputs, seed, diff_threshold,
                                                    diff_timesteps)
        student, report = prune_with_scores(teacher, taylor_scorer(gradients, sparse_ratio), example_inputs, round_to)
        report["calibration_timesteps"] = timesteps
        return student, report
    nni_config = (_float_thresholds(config_list) if config_list is not None
                  else default_config_list(teacher, sparse_ratio))
    masks = nni_masks(teacher, pruner, nni_config, data, seed)
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


def _read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; malformed JSON or another top-level value is a ValueError naming it."""
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: the top level must be an object, got {_json_kind(value)}")
    return value


def _check_keys(value: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    unknown = [k for k in value if k not in allowed]
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(allowed)}")
    missing = [k for k in allowed if k not in value]
    if missing:
        raise ValueError(f"{where}: required key {missing[0]!r} is missing")


def _check_keep(keep: Any, where: str) -> None:
    """A group's ``keep``: a non-empty list of distinct integer channel indices."""
    if not isinstance(keep, list):
        raise ValueError(f"{where}: expected a list of channel indices, got {_json_kind(keep)}")
    if not keep:
        raise ValueError(f"{where}: keeps no channel; at least one index is needed")
    seen: set[int] = set()
    for i, index in enumerate(keep):
        if isinstance(index, bool) or not isinstance(index, int):
            raise ValueError(f"{where}[{i}]: value {index!r} is not allowed: a channel index is an integer, "
                             f"got {_json_kind(index)}")
        if index in seen:
            raise ValueError(f"{where}: index {index} is listed twice; each channel may be kept once")
        seen.add(index)


def check_plan(plan: dict[str, Any], path: str | os.PathLike) -> None:
    """The structure of a pruning plan (keys, types, distinct indices): checked before any model is built."""
    _check_keys(plan, ("groups", "version"), str(path))
    if plan["version"] != PLAN_VERSION:
        raise ValueError(f"{path}: version={plan['version']!r} is not supported; allowed: {PLAN_VERSION}")
    groups = plan["groups"]
    if not isinstance(groups, list):
        raise ValueError(f"{path}: groups: expected a list of objects, got {_json_kind(groups)}")
    roots: set[str] = set()
    for i, group in enumerate(groups):
        where = f"{path}: groups[{i}]"
        if not isinstance(group, dict):
            raise ValueError(f"{where}: expected an object with 'root' and 'keep', got {_json_kind(group)}")
        _check_keys(group, ("keep", "root"), where)
        root = group["root"]
        if not isinstance(root, str) or not root:
            raise ValueError(f"{where}.root: value {root!r} is not allowed: it must be a layer name (a string)")
        if root in roots:
            raise ValueError(f"{where}.root: layer {root!r} has two groups; each layer may have one")
        roots.add(root)
        _check_keep(group["keep"], f"{where}.keep")


def check_plan_widths(plan: dict[str, Any], model: nn.Module, path: str | os.PathLike) -> None:
    """Every group's root is a Conv2d/Linear of the dense ``model`` and keeps indices within its width."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    for i, group in enumerate(plan["groups"]):
        where, root, keep = f"{path}: groups[{i}]", group["root"], group["keep"]
        if root not in layers:
            close = difflib.get_close_matches(root, list(layers), n=3)
            hint = f"; close: {', '.join(close)}" if close else ""
            raise ValueError(f"{where}.root: {root!r} does not match the {type(model).__name__} architecture: "
                             f"it is not a Conv2d or Linear layer there{hint}")
        width = _out_width(layers[root])
        if len(keep) > width:
            raise ValueError(f"{where}.keep: {len(keep)} indices are too many for width {width} ({root})")
        bad = next((k for k in keep if not 0 <= k < width), None)
        if bad is not None:
            raise ValueError(f"{where}.keep: index {bad} is out of range for width {width} ({root}); "
                             f"allowed: 0 to {width - 1}")


def _load_weights(model: nn.Module, path: Path) -> None:
    """Load the weights strictly; names or shapes other than the model's are a ValueError naming the file."""
    tensors = load_tensors(path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    shapes = [k for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        problems = [f"{len(missing)} tensor(s) missing, e.g. {missing[0]!r}" if missing else "",
                    f"{len(unexpected)} unexpected, e.g. {unexpected[0]!r}" if unexpected else "",
                    f"{len(shapes)} of another shape, e.g. {shapes[0]!r}: saved {list(tensors[shapes[0]].shape)}, "
                    f"the plan gives {list(expected[shapes[0]].shape)}" if shapes else ""]
        raise ValueError(f"{path} does not match {path.parent / PLAN_FILE}: "
                         + "; ".join(p for p in problems if p))
    model.load_state_dict(tensors, strict=True)


def load_pruned(folder: str | os.PathLike, example_inputs: dict[str, Any] | None = None) -> nn.Module:
    """Rebuild the dense architecture from its config, apply the plan, load the weights (strict).
    The plan is checked first (a damaged folder is a ValueError naming the file and the entry)."""
    from .models import SUPPORTED_CLASSES

    folder = Path(folder)
    for name in (WEIGHTS_FILE, CONFIG_FILE, PLAN_FILE):
        if not (folder / name).is_file():
            raise ValueError(f"{str(folder)!r} is not a pruned-student folder: {name} is missing")
    config = _read_json_object(folder / CONFIG_FILE)
    plan = _read_json_object(folder / PLAN_FILE)
    class_name = config.get("_class_name")
    if class_name not in SUPPORTED_CLASSES:
        raise ValueError(f"{folder / CONFIG_FILE}: _class_name={class_name!r} is not supported; "
                         f"allowed: {', '.join(SUPPORTED_CLASSES)}")
    check_plan(plan, folder / PLAN_FILE)
    import diffusers

    cls = getattr(diffusers, class_name)
    model = cls.from_config({k: v for k, v in config.items() if not k.startswith("_")}).eval()
    check_plan_widths(plan, model, folder / PLAN_FILE)
    inputs = example_inputs if example_inputs is not None else default_example_inputs(model)
    try:
        apply_plan(model, _dependency_graph(model, inputs), plan["groups"])
    except (KeyError, AttributeError, IndexError, RuntimeError) as e:
        raise ValueError(f"{folder / PLAN_FILE} does not match the {class_name} architecture: {e}") from None
    model.pruning_plan = plan
    _load_weights(model, folder / WEIGHTS_FILE)
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
