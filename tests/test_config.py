"""The config file's validation: every field checked before any work, each problem named (field,
value, what is allowed), all problems at once; the examples valid."""

import re

import pytest
import yaml
from helpers.cli import ROOT

import nni_2ndmatch.finetuners as F
from nni_2ndmatch.config import ConfigError, load_config, validate_config

EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def small_config(compare, finetuner="2ndmatch"):
    return {"model": {"teacher": {"builtin": "tiny-unet"}}, "pruning": {"pruner": "magnitude"},
            "finetune": {"finetuner": finetuner}, "evaluate": {"compare": compare}, "output_dir": "unused"}


def test_examples_are_valid_configs():
    assert EXAMPLES
    for path in EXAMPLES:
        load_config(path)


def test_every_problem_is_reported_at_once():
    raw = yaml.safe_load((ROOT / "examples" / "tiny_finetune.yaml").read_text())
    raw["finetune"].update(lr=5, batch_size=0)
    raw["outputdir"] = raw.pop("output_dir")
    with pytest.raises(ConfigError) as e:
        validate_config(raw)
    text = "\n".join(e.value.problems)
    assert "finetune.lr" in text and "finetune.batch_size" in text and "outputdir" in text
    assert "output_dir: required field is missing" in text


def test_missing_paths_and_an_unknown_pruner_come_with_the_other_problems(tmp_path):
    raw = {"model": {"teacher": {"path": str(tmp_path / "teacher")},
                     "student": {"path": str(tmp_path / "a.txt"), "builtin": "tiny-unet"}},
           "data": {"path": str(tmp_path / "images")}, "pruning": {"pruner": "L3NormPruner", "sparse_ratio": 1.5},
           "output_dir": "unused"}
    (tmp_path / "a.txt").write_text("")
    with pytest.raises(ConfigError) as e:
        validate_config(raw)
    model = "allowed: a model folder (diffusers, pruned student, or a pipeline)"
    assert e.value.problems == [
        f"model.teacher.path: value {str(tmp_path / 'teacher')!r} is not allowed: no such file or folder; {model}",
        f"model.student.path: value {str(tmp_path / 'a.txt')!r} is not allowed: a file; {model}",
        f"data.path: value {str(tmp_path / 'images')!r} is not allowed: no such file or folder; allowed: an image "
        "folder, a save_to_disk folder, or parquet files",
        "model.student: give exactly one of 'builtin', 'path' or 'hub'",
        "pruning.pruner='L3NormPruner' is unknown; allowed: magnitude, taylor, diff-pruning, L1NormPruner, "
        "L2NormPruner, FPGMPruner, TaylorPruner",
        "pruning.sparse_ratio: value 1.5 is not allowed: Input should be less than 1",
    ]  # before: the first teacher folder alone, then the pruner, in three runs
    raw = {"model": {"teacher": {"path": "missing", "width": 0.5}}, "output_dir": "o"}
    with pytest.raises(ConfigError) as e:
        validate_config(raw)
    assert e.value.problems[0].startswith("model.teacher.path: value 'missing' is not allowed: no such file or "
                                          "folder, relative to the working directory ")
    assert "model.teacher: 'width' goes with 'builtin' only" in e.value.problems[1]  # not hidden by the path


def test_compare_defaults_to_empty_and_accepts_other_finetuners():
    raw = small_config([])
    del raw["evaluate"]["compare"]
    assert validate_config(raw).evaluate.compare == []
    assert validate_config(small_config(["kd", "dsm"])).evaluate.compare == ["kd", "dsm"]
    assert validate_config(small_config(["2ndmatch"], finetuner="kd")).evaluate.compare == ["2ndmatch"]


def test_compare_takes_a_baseline_with_its_own_options():
    entries = ["dsm", {"finetuner": "2ndmatch", "jac_match": "vector", "jac_every": 4}]
    evaluate = validate_config(small_config(entries, finetuner="kd")).evaluate
    assert evaluate.baselines() == [("dsm", {}), ("2ndmatch", {"jac_match": "vector", "jac_every": 4})]


@pytest.mark.parametrize("compare, finetuner, expected", [
    (["kdd"], "2ndmatch", r"^evaluate\.compare\[0\]: value 'kdd' is not allowed: not a registered finetuner; did you "
                          r"mean 'kd'\?.*allowed: 2ndmatch, dsm, kd"),
    (["2ndmatch"], "2ndmatch", r"evaluate\.compare\[0\]: value '2ndmatch' is not allowed: it is the run's own "
                               r"finetuner.*allowed: dsm, kd"),
    (["dsm", "kd"], "kd", r"evaluate\.compare\[1\]: value 'kd' is not allowed: it is the run's own finetuner.*"
                          r"allowed: 2ndmatch, dsm"),
    (["kd", "dsm", "kd"], "2ndmatch", r"^evaluate\.compare\[2\]: 'kd' is listed more than once"),
    (["dsm", {"finetuner": "dsm"}], "kd", r"^evaluate\.compare\[1\]: 'dsm' is listed more than once"),
    ([{"jac_match": "vector"}], "kd", r"^evaluate\.compare\[0\]: the mapping has no 'finetuner' key"),
    ([{"finetuner": "2ndmach"}], "kd", r"^evaluate\.compare\[0\]\.finetuner: value '2ndmach' is not allowed: not a "
                                       r"registered finetuner; did you mean '2ndmatch'\?"),
    ([{"finetuner": "2ndmatch", "jac_matc": "vector"}], "kd", r"^evaluate\.compare\[0\]\.jac_matc: unknown key for "
                                                              r"finetuner '2ndmatch'; did you mean 'jac_match'\?"),
    ([{"finetuner": "2ndmatch", "jac_match": "vektor"}], "kd", r"^evaluate\.compare\[0\]\.jac_match: value 'vektor' "
                                                               r"is not allowed: .*'vector'"),
    ([{"finetuner": "kd", "lambda_jac": 1.0}], "2ndmatch", r"^evaluate\.compare\[0\]\.lambda_jac: unknown key for "
                                                           r"finetuner 'kd'"),
])
def test_bad_compare_is_a_config_error_naming_the_value(compare, finetuner, expected):
    with pytest.raises(ConfigError) as caught:
        validate_config(small_config(compare, finetuner))
    assert isinstance(caught.value, ValueError)
    assert len(caught.value.problems) == 1 and re.search(expected, caught.value.problems[0]), caught.value.problems


def test_a_config_sections_options_are_validated_once_and_taken_as_they_are(tmp_path):
    from nni_2ndmatch.job.finetune import make_finetuner

    config = validate_config({"model": {"teacher": {"builtin": "tiny-unet"}}, "pruning": {"pruner": "magnitude"},
                              "finetune": {"finetuner": "2ndmatch", "jac_every": 4, "lambda_jac": 0.5},
                              "output_dir": str(tmp_path)})
    ft = make_finetuner(config)
    assert ft.opts is config.finetune.options and (ft.jac_every, ft.lambda_jac) == (4, 0.5)
    assert config.finetune.finetuner_kwargs() == ft.options()
    with pytest.raises(TypeError, match="give a SecondMatchOptions alone, or the options as keywords"):
        F.SecondMatch(options=F.KDOptions())
    with pytest.raises(TypeError, match="give a KDOptions alone"):
        F.KD(options=F.KDOptions(), lambda_kd=2.0)


def _tiny(**sections):
    raw = {"model": {"teacher": {"builtin": "tiny-unet"}}, "pruning": {"pruner": "magnitude"},
           "finetune": {"finetuner": "2ndmatch", "steps": 10}, "output_dir": "unused"}
    for key, value in sections.items():
        raw[key] = {**raw[key], **value} if isinstance(raw.get(key), dict) and value is not None else value
    return raw


@pytest.mark.parametrize("sections, expected", [
    ({"model": {"teacher": {"path": "some/model", "width": 0.5}}},
     r"model.teacher: 'width' goes with 'builtin' only"),
    ({"model": {"teacher": {"hub": "org/model", "seed": 3}}}, r"model.teacher: 'seed' goes with 'builtin' only"),
    ({"finetune": {"validation_images": 8}}, r"finetune: validation_images is given but validation_every is 0"),
    ({"finetune": {"device": "tpu"}}, r"finetune.device: value 'tpu' is not allowed: not a torch device; allowed: "
                                      r"cpu, cuda, cuda:N \(N an index\), mps"),
    ({"evaluate": {"equal_wallclock": True}}, r"evaluate: equal_wallclock is true but compare lists no baseline"),
    ({"export": {"backends": []}}, r"export.backends: value \[\] is not allowed"),
    ({"export": {"opset": 17}}, r"export.opset: value 17 is not allowed: Input should be greater than or equal to 18"),
    ({"output_dir": ""}, r"output_dir: value '' is not allowed"),
    ({"evaluate": None}, r"evaluate: the section is empty \(null\), which would leave it out; write 'evaluate: \{\}'"),
    ({"export": None}, r"export: the section is empty \(null\)"),
    ({"finetune": {1: 2}}, r"finetune: key 1 is not allowed: an option's name is text"),
    ({"finetune": {"lambda_jac": 0.0}}, r"finetune.lambda_jac: value 0.0 is not allowed: the Jacobian term would "
                                        r"still be computed every step.*finetuner kd"),
    ({"finetune": {"finetuner": "kd", "lambda_dsm": 0.0, "lambda_kd": 0.0}},
     r"finetune: every loss weight is 0 \(lambda_dsm, lambda_kd\)"),
    ({"finetune": {"mode": "vjp", "fd_step": 0.005}},
     r"finetune.fd_step: value 0.005 is not allowed: it is the step of mode fd .*not of mode 'vjp'"),
    ({"finetune": {"jac_every": 50}}, r"finetune.jac_every: value 50 is not allowed with steps 10: the Jacobian term "
                                      r"would never be computed; allowed: 1 to 10"),
    ({"finetune": {"mode": "jvp", "gradient_checkpointing": True}},
     r"finetune.gradient_checkpointing: value True is not allowed with mode 'jvp'"),
    ({"finetune": {"warmup_steps": 11}}, r"finetune.warmup_steps: value 11 is not allowed: the learning rate "
                                         r"would never reach lr in steps=10"),
])
def test_an_option_that_would_do_nothing_is_an_error_naming_it(sections, expected):
    with pytest.raises(ConfigError) as caught:
        validate_config(_tiny(**sections))
    assert any(re.search(expected, p) for p in caught.value.problems), caught.value.problems


def test_the_same_options_where_they_act_are_accepted():
    config = validate_config(_tiny(finetune={"validation_every": 5, "validation_images": 8, "mode": "fd",
                                             "fd_step": 0.01, "jac_every": 10, "warmup_steps": 10, "device": "cuda:1"},
                                   evaluate={"compare": ["kd"], "equal_wallclock": True}, export={}))
    assert config.evaluate.equal_wallclock and config.export.backends == ["onnxruntime"]
    assert config.finetune.options.fd_step == 0.01
    assert validate_config(_tiny(finetune={"mode": "auto", "fd_step": 0.01})).finetune.options.fd_step == 0.01


def test_exponents_without_a_dot_are_numbers_in_a_config_file(tmp_path):
    raw = _tiny(finetune={"mode": "fd"})
    text = yaml.safe_dump(raw).replace("steps: 10", "steps: 10\n  lr: 1e-4\n  fd_step: 1e-3\n  lambda_jac: 5E-2")
    (tmp_path / "c.yaml").write_text(text)
    options = load_config(tmp_path / "c.yaml").finetune
    assert (options.lr, options.options.fd_step, options.options.lambda_jac) == (1e-4, 1e-3, 5e-2)
