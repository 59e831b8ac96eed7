"""NNI 3.0 pruning config_list checks: every entry's keys, ranges and selectors, and against a model.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from torch import nn

from ..pruning import OUTPUT_LAYERS
from ..utils import did_you_mean, is_number, json_kind

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




def _yaml_kind(value: Any) -> str:
    return "a mapping" if isinstance(value, dict) else json_kind(value)  # config_list is written in YAML



def _unknown_key(key: Any, allowed: tuple[str, ...], where: str) -> str:
    if key in LEGACY_KEYS:
        return f"{where}.{key}: {key!r} is a pre-3.0 NNI key; use {LEGACY_KEYS[key]}"
    hint = did_you_mean(key, list(allowed)) if isinstance(key, str) else ""
    return f"{where}.{key}: unknown key{hint} (allowed: {', '.join(allowed)})"


def _ratio_problem(key: str, value: Any, where: str) -> str | None:
    low, high, low_ok, high_ok = RATIO_RANGES[key]
    if is_number(value) and (low <= value if low_ok else low < value) and (value <= high if high_ok else value < high):
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
    if "sparse_threshold" in setting and not (is_number(threshold) and threshold > 0):
        problems.append(f"{where}.sparse_threshold: value {threshold!r} is not allowed: it must be a number > 0")
    low, high = setting.get("min_sparse_ratio"), setting.get("max_sparse_ratio")
    if is_number(low) and is_number(high) and low > high:
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


#: The layer types whose output channels a student loses (what an NNI mask can become)
PRUNABLE_TYPES = ("Conv2d", "Linear")


def _selector_problems(entry: dict[str, Any], where: str, names: dict[str, str], types: list[str],
                       model_name: str) -> list[str]:
    problems = []
    for key in ("op_types", "exclude_op_types"):
        for value in entry.get(key, []):
            if value not in types:
                problems.append(f"{where}.{key}: {value!r} is not a layer type of this {model_name}"
                                f"{did_you_mean(value, types)} (types present: {', '.join(types)})")
            elif key == "op_types" and value not in PRUNABLE_TYPES:
                problems.append(f"{where}.op_types: {value!r} is not allowed: the student loses output channels "
                                f"of {' and '.join(PRUNABLE_TYPES)} layers only; allowed: {', '.join(PRUNABLE_TYPES)}")
    for value in entry.get("op_names", []):
        if value in names and names[value] not in PRUNABLE_TYPES:  # (an unknown name: below)
            problems.append(f"{where}.op_names: {value!r} is a {names[value]}, which is not allowed: the student loses "
                            f"output channels of {' and '.join(PRUNABLE_TYPES)} layers only")
    for key in ("op_names", "exclude_op_names"):
        for value in entry.get(key, []):
            if value not in names:
                hint = did_you_mean(value, list(names), n=3) or f"; module names are like {list(names)[-1]!r}"
                problems.append(f"{where}.{key}: {value!r} is not a module of this {model_name}{hint}")
    for pattern in entry.get("op_names_re", []):
        if not any(re.match(pattern, name) for name in names):
            problems.append(f"{where}.op_names_re: {pattern!r} matches no module name of this {model_name}")
    if problems:
        return problems
    selected = _selected(entry, names)
    other = [name for name in selected if names[name] not in PRUNABLE_TYPES]
    if other:  # (through op_names_re: NNI would stop on an AssertionError at the first)
        more = f" (and {len(other) - 1} more)" if len(other) > 1 else ""
        problems.append(f"{where}: selects {other[0]!r}, a {names[other[0]]}{more}, which is not allowed: the student "
                        f"loses output channels of {' and '.join(PRUNABLE_TYPES)} layers only; add op_types: "
                        f"[{', '.join(PRUNABLE_TYPES)}] or select fewer")
    elif not selected:
        problems.append(f"{where}: selects no layer of this {model_name} (what it names, of its op_types, less its "
                        "exclusions), so it would prune nothing; allowed: an entry that selects a Conv2d or Linear")
    return problems


def _selected(entry: dict[str, Any], names: dict[str, str]) -> list[str]:
    """The modules an NNI config_list entry selects (name -> type in ``names``), by NNI's rule: in
    op_names or matched by op_names_re (when either is given), of op_types (when given), and not
    excluded by name, pattern or type."""
    def matched(name: str, key: str) -> bool:
        return any(re.match(pattern, name) for pattern in entry.get(key, []))

    chosen = entry.get("op_names") or entry.get("op_names_re")
    return [name for name, kind in names.items()
            if (not chosen or name in entry.get("op_names", []) or matched(name, "op_names_re"))
            and (not entry.get("op_types") or kind in entry["op_types"])
            and name not in entry.get("exclude_op_names", []) and not matched(name, "exclude_op_names_re")
            and kind not in entry.get("exclude_op_types", [])]


def check_config_list_model(config_list: list[dict[str, Any]], model: nn.Module) -> None:
    """The layer types and names a (well-formed) config_list names exist in ``model``: a ValueError if not."""
    names = {name: type(module).__name__ for name, module in model.named_modules() if name}
    types = sorted({type(m).__name__ for m in model.modules()})
    problems = [p for i, entry in enumerate(config_list)
                for p in _selector_problems(entry, f"config_list[{i}]", names, types, type(model).__name__)]
    if problems:
        raise ValueError("\n".join(problems))


def float_thresholds(config_list: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A copy where integer sparse_threshold values are floats (NNI's schema accepts floats only)."""
    config_list = copy.deepcopy(config_list)
    for entry in config_list:
        for setting in [entry, *(entry.get("target_settings") or {}).values()]:
            if is_number(setting.get("sparse_threshold")):
                setting["sparse_threshold"] = float(setting["sparse_threshold"])
    return config_list


def default_config_list(model: nn.Module, sparse_ratio: float) -> list[dict[str, Any]]:
    """NNI config_list: every Conv2d and Linear at ``sparse_ratio``, the output layers excluded."""
    exclude = [name for name, _ in model.named_modules() if name in OUTPUT_LAYERS]
    return [{"op_types": ["Conv2d", "Linear"], "sparse_ratio": sparse_ratio, "exclude_op_names": exclude}]
