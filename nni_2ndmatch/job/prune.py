"""The prune stage: the student from the teacher as the pruning section says, saved in output_dir/pruned."""

from __future__ import annotations

import json
import logging
from typing import Any

import torch
import yaml
from torch import nn

from ..config import Config
from ..data import collate
from ..errors import UserError, user_errors
from ..files import atomic_write_json
from ..models import default_example_inputs
from ..nni import prune_diffusers
from ..pruning import is_pruned_folder, load_pruned, save_pruned
from ..training import Runtime
from .output import RunFolder, flatten

logger = logging.getLogger(__name__)


def _example_inputs(teacher: nn.Module, item: Any) -> dict[str, Any]:
    """The teacher's forward arguments, shaped like one data item (with its conditioning)."""
    inputs = default_example_inputs(teacher)
    x, kwargs = collate([item], torch.device("cpu"))
    inputs[next(iter(inputs))] = x
    inputs.update(kwargs)
    return inputs


def run_prune(config: Config, folder: RunFolder, teacher: nn.Module, dataset: torch.utils.data.Dataset,
              runtime: Runtime | None = None, scheduler: Any = None) -> tuple[nn.Module, dict[str, Any]]:
    """Make the student from the teacher as the pruning section says; save it in ``folder.pruned``.
    ``scheduler``: the teacher's training schedule (a pipeline's), by which gradient pruners noise
    the data; None: the reference DDPM one.
    With several processes the main one prunes and the others load what it saved."""
    runtime = runtime or Runtime()

    def prune() -> tuple[nn.Module, dict[str, Any]]:
        p = config.pruning
        with user_errors("pruning"):  # e.g. a config_list NNI refuses
            student, report = prune_diffusers(teacher, p.pruner, p.sparse_ratio, round_to=p.round_to,
                                              example_inputs=_example_inputs(teacher, dataset[0]),
                                              config_list=p.config_list, data=dataset, seed=config.finetune.seed,
                                              scheduler=scheduler)
        save_pruned(student, folder.pruned)
        atomic_write_json(folder.pruning_report, report)
        logger.info("pruned: MACs %.3g -> %.3g (%.2fx), params %d -> %d; saved to %s", report["macs_before"],
                    report["macs_after"], report["macs_ratio"], report["params_before"], report["params_after"],
                    folder.pruned)
        return student, report
    pruned = runtime.on_main(prune)
    return pruned or (load_pruned(folder.pruned), json.loads(folder.pruning_report.read_text()))


def check_pruned_start(folder: RunFolder, config: Config) -> None:
    """Before ``finetune`` (without ``model.student``) touches the folder: the student an earlier
    ``prune`` saved is there, and was made from this config's model and pruning sections (as the
    folder's config.yaml records them), so that what the run reports is what it finetuned."""
    if not is_pruned_folder(folder.pruned):
        raise UserError(f"no pruned student in {str(folder.pruned)!r}: run 'nni-2ndmatch prune' (or 'run') first")
    if not folder.config.is_file():
        return
    recorded, given = yaml.safe_load(folder.config.read_text()) or {}, config.model_dump(mode="json")
    before, now = (flatten({k: sections.get(k) for k in ("model", "pruning")}) for sections in (recorded, given))
    changed = [f"{k} ({before[k]!r} -> {now[k]!r})" for k in sorted(before.keys() & now.keys())
               if before[k] != now[k]]  # (a field that a newer version added is in one of them only)
    if changed:
        raise UserError(f"the config differs from the one that pruned {str(folder.pruned)!r} ({folder.config}) in "
                        f"{', '.join(changed)}; finetune with the sections that made it, or prune again "
                        "('nni-2ndmatch prune --overwrite', or 'run')")


def saved_pruned_student(folder: RunFolder) -> nn.Module:
    """The student ``run_prune`` saved (what ``finetune`` starts from without ``model.student``)."""
    if is_pruned_folder(folder.pruned):
        return load_pruned(folder.pruned)
    raise UserError(f"no pruned student in {str(folder.pruned)!r}: run 'nni-2ndmatch prune' (or 'run') first")
