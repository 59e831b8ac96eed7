"""The model card of a run: ``README.md`` in ``output_dir/student`` and ``output_dir/pipeline``, in the
Hugging Face Hub's format (YAML front matter, then what a reader of a model page needs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from ..config import Config
from ..files import atomic_write_text
from ..layout import PIPELINE_DIR, PRUNING_REPORT, REPORT_DIR, RESULTS_FILE, STUDENT_DIR
from ..models.pipelines import null_components
from ..pruning import is_pruned_folder
from .results import RunSummary

CARD_FILE = "README.md"


def _source(spec: Any) -> str:
    """How a config names a model or data set, without the machine's folders."""
    if spec.builtin is not None:
        return f"the built-in `{spec.builtin}`"
    if getattr(spec, "hub", None):
        return f"[{spec.hub}](https://huggingface.co/{spec.hub})"
    return f"a local {'folder' if Path(spec.path).is_dir() else 'file'} (`{Path(spec.path).name}`)"


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _ratio(pruning: dict[str, Any]) -> str:
    if pruning.get("sparse_ratio") is not None:
        return f"at sparse ratio {pruning['sparse_ratio']:g}"
    return f"with the config_list of {len(pruning.get('config_list') or [])} entry(ies) in the run's config.yaml"


def model_card(config: Config, summary: RunSummary, pruning: dict[str, Any] | None,
               results: dict[str, Any] | None, *, pipeline: bool, nulls: tuple[str, ...] = (),
               pruned: bool = True) -> str:
    """The card's text for the student folder (``pipeline=False``) or the pipeline folder, whose
    components saved as null (``nulls``: SD3 without T5) diffusers must be given as None.
    ``pruned``: the student is of a pruned class (a given student may be an ordinary diffusers model)."""
    teacher = config.model.teacher
    front: dict[str, Any] = {"library_name": "diffusers"}
    if getattr(teacher, "hub", None):
        front["base_model"] = teacher.hub
    front["tags"] = ["nni-2ndmatch", "pruned", *(["distillation"] if summary.finetuner != "dsm" else []),
                     summary.finetuner]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# A pruned {'pipeline' if pipeline else 'denoiser'} finetuned with {summary.finetuner}", "",
             (f"The teacher pipeline, {_source(teacher)}, with its denoiser made physically smaller " if pipeline
              else f"The teacher, {_source(teacher)}, made physically smaller ")
             + (f"by `{pruning['pruner']}` {_ratio(pruning)}" if pruning else "(a given student)")
             + f", then finetuned with `{summary.finetuner}` by nni-2ndmatch.", ""]
    if pruning:
        lines += ["## Size", "", "| | teacher | student | ratio |", "|---|---:|---:|---:|",
                  f"| parameters | {pruning['params_before']:,} | {pruning['params_after']:,} | "
                  f"{pruning['params_ratio']:.3f} |",
                  f"| MACs per sample | {pruning['macs_before']:,.0f} | {pruning['macs_after']:,.0f} | "
                  f"{pruning['macs_ratio']:.3f} |", ""]
    loop = summary.train_config
    lines += ["## Finetuning", "", f"- finetuner: `{summary.finetuner}`, options "
              f"`{json.dumps(summary.finetuner_options, sort_keys=True)}`",
              f"- {summary.steps} steps of batch {loop['batch_size']}, lr {loop['lr']:g} ({loop['lr_schedule']}), "
              f"seed {loop['seed']}, {summary.processes} process(es), {summary.seconds:.0f} s",
              f"- data: {_source(config.data)} at {config.data.resolution}x{config.data.resolution}", ""]
    quality = (results or {}).get("quality")
    if quality:
        lines += [f"## Quality ({quality['samples']} samples each from the same noise, {quality['ddim_steps']} "
                  f"{quality.get('sampler', 'DDIM')} steps)", "", "| score | teacher | student |", "|---|---:|---:|"]
        for key, label in (("digits_fid", "digits-FID"), ("fid", "FID"), ("clip_score", "CLIP score")):
            if f"{key}_student" in quality:
                lines.append(f"| {label} | {quality[f'{key}_teacher']:.3f} | {quality[f'{key}_student']:.3f} |")
        lines += [f"| fidelity (RMS from the teacher's samples) | 0 | {quality['fidelity']:.4f} |", ""]
    latency = (results or {}).get("latency")
    if latency:
        lines += ["## Latency (student vs teacher, measured by the run)", "", "| backend | batch | speed-up |",
                  "|---|---:|---:|"]
        lines += [f"| {row['variant']} | {row['batch']} | {row['speedup']:.2f}x |" for row in latency["rows"]]
        lines.append("")
    folder = PIPELINE_DIR if pipeline else STUDENT_DIR
    remote = ", trust_remote_code=True" if pruned else ""
    without = (f'from diffusers import DiffusionPipeline\n\npipe = DiffusionPipeline.from_pretrained("{folder}"'
               f'{remote}{"".join(f", {name}=None" for name in nulls)})' if pipeline else
               f'from diffusers import AutoModel\n\nstudent = AutoModel.from_pretrained("{folder}"{remote})')
    lines += ["## How to load", ""]
    if not pruned:
        return "\n".join(lines + ["The student is an ordinary diffusers model (a given student, not pruned by the "
                                   "run): diffusers loads it as it is.", "", "```python", without, "```", ""])
    with_package = (f'from nni_2ndmatch import load_pipeline\n\npipe = load_pipeline("{folder}")' if pipeline else
                    f'from nni_2ndmatch import load_pruned\n\nstudent = load_pruned("{folder}")')
    lines += ["With nni-2ndmatch installed (it rebuilds the pruned model from its config and "
              "runs no code from the folder):", "", "```python", with_package, "```", "",
              "With diffusers alone: the pruned model's class travels in its folder as `nni_2ndmatch.py` (it "
              "imports only torch and diffusers), which diffusers runs when asked to:", "", "```python", without,
              "```", ""]
    return "\n".join(lines)


def write_model_cards(config: Config, out: Path, summary: RunSummary, *, reported: bool) -> None:
    """README.md in the student folder and, for a pipeline teacher, in the pipeline folder, from the
    run's pruning report (when its config prunes: a given student is not the one an earlier
    ``prune`` reported) and, when this run ``reported``, its report's results."""
    pruning = _read_json(out / PRUNING_REPORT) if config.pruning is not None else None
    results = _read_json(out / REPORT_DIR / RESULTS_FILE) if reported else None
    pruned = is_pruned_folder(out / STUDENT_DIR)
    atomic_write_text(out / STUDENT_DIR / CARD_FILE,
                      model_card(config, summary, pruning, results, pipeline=False, pruned=pruned))
    if summary.pipeline_dir is not None:
        nulls = tuple(null_components(out / summary.pipeline_dir))
        atomic_write_text(out / summary.pipeline_dir / CARD_FILE,
                          model_card(config, summary, pruning, results, pipeline=True, nulls=nulls, pruned=pruned))
