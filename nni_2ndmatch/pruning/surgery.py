"""Pruning surgery: channel scores -> a physically smaller diffusers model.

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
import io
import logging
import math
import warnings
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..method import forward_kwargs
from ..models import default_example_inputs, diffusers_class_name
from ..utils import is_number, requires_grad

logger = logging.getLogger(__name__)


PLAN_VERSION = 1


#: Layers that produce the model's output keep their size.
OUTPUT_LAYERS = ("conv_out", "proj_out", "proj_out_2")


#: (torch-pruning group, {module: name} of the model being pruned) -> (a score per root channel,
#: higher = keep; the share of the group's channels to prune, <= 0 = leave the group whole)
GroupScorer = Callable[[Any, dict[nn.Module, str]], tuple[Tensor, float]]


#: Layers of a joint (MMDiT) transformer whose outputs are the text stream's residual width.
TEXT_STREAM_LAYERS = ("context_embedder",)


def _fixed_layers(model: nn.Module) -> list[nn.Module]:
    """Layers whose output channels never change: the output layers, patch embeddings (their
    fixed sin-cos position table spans the transformer's residual width), and in a joint
    transformer (SD3) the text stream's embedding and the adaptive norms' modulation layers (their
    output is a stack of shifts, scales and gates of a residual width; the widths stay, the
    attention and MLP inner widths are pruned)."""
    from diffusers.models import normalization
    from diffusers.models.embeddings import PatchEmbed

    modulated = tuple(getattr(normalization, n) for n in ("AdaLayerNormZero", "AdaLayerNormContinuous",
                                                          "SD35AdaLayerNormZeroX") if hasattr(normalization, n))
    fixed = [m for name, m in model.named_modules() if name in OUTPUT_LAYERS + TEXT_STREAM_LAYERS]
    if diffusers_class_name(model) in JOINT:
        fixed += [m.linear for m in model.modules() if isinstance(m, modulated)]
    return fixed + [m.proj for m in model.modules() if isinstance(m, PatchEmbed)]


#: Joint-attention transformers: image and text tokens attend together.
JOINT = ("SD3Transformer2DModel",)


def _attentions(model: nn.Module) -> list[nn.Module]:
    from diffusers.models.attention_processor import Attention

    return [m for m in model.modules() if isinstance(m, Attention) and isinstance(getattr(m, "to_q", None), nn.Linear)]


def _attention_heads(model: nn.Module) -> dict[nn.Module, int]:
    heads = {}
    for m in _attentions(model):
        for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
            if isinstance(getattr(m, name, None), nn.Linear):
                heads[getattr(m, name)] = m.heads
    return heads


def refuse_per_head_norms(model: nn.Module) -> None:
    """Attention with per-head query/key norms (``qk_norm``: SD3.5's, Flux's) shares one norm weight
    over every head's channels, which pruning channels within heads would mismatch: refused."""
    names = _module_names(model)
    normed = [names[a] for a in _attentions(model) if getattr(a, "norm_q", None) is not None]
    if normed:
        raise ValueError(f"{type(model).__name__}: attention {normed[0]} normalises queries and keys per head "
                         f"(qk_norm, as SD3.5 and Flux do; {len(normed)} such layers), which the pruning surgery does "
                         "not support yet; allowed: attention without qk_norm (SD 1.x/2.x, SDXL, SD3, DiT)")


def _keep_attention_logits(head_widths: dict[nn.Module, int]) -> None:
    """Heads cut from d to d' channels keep the dense model's logits q.k / sqrt(d): attention divides
    by the square root of the width it is given (scaled_dot_product_attention's default; ``attn.scale``
    for diffusers' other processors), which would otherwise sharpen every head by sqrt(d / d'). The
    queries (image and text streams) are scaled by sqrt(d' / d) and ``attn.scale`` set to d'^-1/2,
    so the pruned model computes what the dense one computes with those channels zeroed."""
    for attn, before in head_widths.items():
        after = attn.to_q.out_features // attn.heads
        if after == before or not getattr(attn, "scale_qk", True):
            continue
        factor = math.sqrt(after / before)
        with torch.no_grad():
            for name in ("to_q", "add_q_proj"):
                layer = getattr(attn, name, None)
                if isinstance(layer, nn.Linear):
                    layer.weight.mul_(factor)
                    if layer.bias is not None:
                        layer.bias.mul_(factor)
        attn.scale = after ** -0.5


def dependency_graph(model: nn.Module, example_inputs: dict[str, Any]):
    import torch_pruning as tp

    # torch-pruning silently prunes nothing where parameters do not require grad.
    with requires_grad(model, True), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tp.DependencyGraph().build_dependency(model, example_inputs=forward_kwargs(example_inputs))


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


def out_width(module: nn.Module) -> int:
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

    head_widths = {attn: attn.to_q.out_features // attn.heads for attn in _attentions(model)}
    for entry in plan:
        module = model.get_submodule(entry["root"])
        total = out_width(module)
        keep = set(entry["keep"])
        prune = [i for i in range(total) if i not in keep]
        if not prune:
            continue
        fn = tp.prune_conv_out_channels if isinstance(module, nn.Conv2d) else tp.prune_linear_out_channels
        graph.get_pruning_group(module, fn, prune).prune()
        now = out_width(module)
        if now != len(keep):
            raise RuntimeError(f"{entry['root']}: pruning left {now} channels, the plan keeps {len(keep)}")
    _keep_attention_logits(head_widths)
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
        channels = out_width(root)
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


def macs_params(model: nn.Module, example_inputs: dict[str, Any]) -> tuple[float, int]:
    """MACs of one sample, and parameters."""
    import torch_pruning as tp

    batch = next(v.shape[0] for v in example_inputs.values() if isinstance(v, Tensor) and v.dim() > 0)
    one = {k: v[:1] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == batch else v
           for k, v in example_inputs.items()}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # it prints warnings
        warnings.simplefilter("ignore")
        macs, params = tp.utils.count_ops_and_params(model, example_inputs=forward_kwargs(one))
    return float(macs), int(params)


def check_ratio(sparse_ratio: float) -> None:
    if not is_number(sparse_ratio) or not 0 < sparse_ratio < 1:
        raise ValueError(f"sparse_ratio={sparse_ratio!r} is not allowed; it must be in (0, 1)")


def prune_with_scores(teacher: nn.Module, scorer: GroupScorer, example_inputs: dict[str, Any],
                      round_to: int | None = 8) -> tuple[nn.Module, dict[str, Any]]:
    """A pruned copy of ``teacher`` (never modified) and a report; ``scorer`` decides, for each
    coupled group of the copy, which channels to prefer and what share to prune."""
    if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
        raise ValueError(f"round_to={round_to!r} is not allowed; it must be an integer >= 1 or None")
    refuse_per_head_norms(teacher)
    student = copy.deepcopy(teacher).eval()
    before = macs_params(student, example_inputs)
    graph = dependency_graph(student, example_inputs)
    plan, groups = _plan(student, graph, scorer, round_to)
    apply_plan(student, graph, plan)
    student.zero_grad(set_to_none=True)  # gradient scorers attach gradients to the copy
    after = macs_params(student, example_inputs)
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


def _mask_keep(masks: dict[str, dict[str, Tensor]], group, names: dict[nn.Module, str],
               used: set[str]) -> tuple[Tensor, Tensor, list[str]]:
    """Per root channel: how many masked layers of the group keep it, and how many masked layers
    cover it (NNI masks: {module name: {"weight": mask}}, a zero output row = a pruned channel);
    and the group's layers that lose output channels with it but have no mask. The names of the
    masked layers read are added to ``used``."""
    root, _ = _root(group)
    width = out_width(root)
    kept, covered, unmasked = torch.zeros(width), torch.zeros(width), set()
    out_fns = _out_pruning_fns()
    for i, (dep, idxs) in enumerate(group):
        if dep.handler not in out_fns:
            continue
        name = names.get(dep.target.module)
        if name not in masks or "weight" not in masks[name]:
            unmasked.add(name)
            continue
        used.add(name)
        keep = (masks[name]["weight"].detach().flatten(1).abs().sum(1) > 0).float().cpu()
        root_idxs = torch.tensor([int(r) for r in group[i].root_idxs])
        local = torch.tensor([int(j) for j in idxs])
        kept.index_add_(0, root_idxs, keep[local])
        covered.index_add_(0, root_idxs, torch.ones(len(local)))
    return kept, covered, sorted(unmasked)


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
    used: set[str] = set()
    seen: dict[str, tuple[Tensor, Tensor, list[str]]] = {}  # root name -> _mask_keep's answer

    def scorer(group, names: dict[nn.Module, str]) -> tuple[Tensor, float]:
        kept, covered, unmasked = seen[names[_root(group)[0]]] = _mask_keep(masks, group, names, used)
        if covered.sum() == 0:  # no masked layer in the group: NNI prunes none of it
            return kept, 0.0
        magnitude = magnitude_scores(group).float().cpu()
        scores = kept / covered.clamp_min(1) + 1e-3 * magnitude / magnitude.max().clamp_min(1e-12)
        return scores, float(1.0 - kept.sum() / covered.sum())

    student, report = prune_with_scores(teacher, scorer, inputs, round_to)
    _report_mask_agreement(report, student.pruning_plan["groups"], seen)
    ignored = sorted(name for name, parts in masks.items() if name not in used
                     and any(bool((m == 0).any()) for m in parts.values() if isinstance(m, Tensor)))
    report["masks_not_applied"] = ignored
    if ignored:
        logger.warning("masks_to_student: the masks of %d layer(s) prune nothing in the student (%s%s): their "
                       "channels are the residual width, a fixed layer's, or not output channels of a weight",
                       len(ignored), ", ".join(ignored[:5]), ", ..." if len(ignored) > 5 else "")
    return student, report


def _report_mask_agreement(report: dict[str, Any], plan: list[dict[str, Any]],
                           seen: dict[str, tuple[Tensor, Tensor, list[str]]]) -> None:
    """Add to each pruned group of ``report`` how far its kept channels are the ones NNI's masks
    keep (``mask_agreement``: the masked layers' mean share, 1.0 = all of them), and which of its
    layers lose output channels without a mask of their own (``pruned_without_mask``: a layer a
    config_list excluded, or did not select, that is coupled to a masked one); the report's
    ``mask_agreement`` is the mean over all kept channels that a mask covers. Such layers are also
    logged."""
    keeps = {entry["root"]: entry["keep"] for entry in plan}
    total, agreeing = 0, 0.0
    for group in report["groups"]:
        kept, covered, unmasked = seen[group["root"]]
        keep = torch.tensor(keeps[group["root"]])
        keep = keep[covered[keep] > 0]
        share = kept[keep] / covered[keep]
        group["mask_agreement"] = round(float(share.mean()), 4) if len(keep) else None
        group["pruned_without_mask"] = unmasked if group["kept"] < group["channels"] else []  # rounding may keep all
        total, agreeing = total + len(keep), agreeing + float(share.sum())
    report["mask_agreement"] = round(agreeing / total, 4) if total else None
    coupled = sorted({name for group in report["groups"] for name in group["pruned_without_mask"]})
    if coupled:
        logger.warning("masks_to_student: %d layer(s) without a mask lose output channels, coupled to masked layers "
                       "(a config_list that excludes or leaves out a layer cannot keep it whole if it shares "
                       "channels with a pruned one): %s%s", len(coupled), ", ".join(coupled[:5]),
                       ", ..." if len(coupled) > 5 else "")
