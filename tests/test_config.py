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


def test_compare_defaults_to_empty_and_accepts_other_finetuners():
    raw = small_config([])
    del raw["evaluate"]["compare"]
    assert validate_config(raw).evaluate.compare == []
    assert validate_config(small_config(["kd", "dsm"])).evaluate.compare == ["kd", "dsm"]
    assert validate_config(small_config(["2ndmatch"], finetuner="kd")).evaluate.compare == ["2ndmatch"]


@pytest.mark.parametrize("compare, finetuner, expected", [
    (["kdd"], "2ndmatch", r"evaluate\.compare: value \['kdd'\].*'kdd' is not a registered finetuner; did you mean "
                          r"'kd'\?.*allowed: 2ndmatch, dsm, kd"),
    (["2ndmatch"], "2ndmatch", r"evaluate\.compare: value '2ndmatch' is not allowed: it is the run's own finetuner"
                               r".*allowed: dsm, kd"),
    (["dsm", "kd"], "kd", r"evaluate\.compare: value 'kd' is not allowed: it is the run's own finetuner.*"
                          r"allowed: 2ndmatch, dsm"),
    (["kd", "dsm", "kd"], "2ndmatch", r"evaluate\.compare: value \['kd', 'dsm', 'kd'\].*'kd' is listed more than once"),
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
