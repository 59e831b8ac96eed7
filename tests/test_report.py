"""The run report: evaluate.compare (config rules, baselines finetuned from the same pruned
student), the weighted loss curves and the report's structure."""

import copy
import json
import math

import pytest
import torch

from nni_2ndmatch import get_finetuner
from nni_2ndmatch.config import validate_config
from nni_2ndmatch.job.report import shift_headings, weighted_loss_series
from nni_2ndmatch.training import Watch


def test_loss_series_weighs_each_term_as_in_the_total():
    weights = get_finetuner("2ndmatch", lambda_kd=0.5, lambda_jac=0.001).weights()
    assert weights == {"dsm": 1.0, "kd": 0.5, "jac": 0.001}
    records = [{"step": s, "lr": 1e-3, "dsm": 2.0 * s, "kd": 4.0, "jac": 1.8e4} for s in (1, 2)]
    for r in records:
        r["loss"] = r["dsm"] + 0.5 * r["kd"] + 0.001 * r["jac"]
    series = weighted_loss_series(records, weights)
    assert list(series) == ["loss (total)", "dsm", "0.5·kd", "0.001·jac"]
    assert series["0.001·jac"] == [(1, pytest.approx(18.0)), (2, pytest.approx(18.0))]
    for step, total in series["loss (total)"]:  # no weighted term is above the total
        assert all(dict(points)[step] <= total for label, points in series.items())
    assert "kd" not in weighted_loss_series(records, {"kd": 0.0})  # a term of weight 0 is not in the loss


def test_shift_headings_embeds_a_document_as_a_section():
    text = "# Latency\n\ntext\n\n## Detail\n```\n# not a heading\n```"
    assert shift_headings(text, top=2).splitlines() == ["## Latency", "", "text", "", "### Detail", "```",
                                                         "# not a heading", "```"]
    assert shift_headings("no headings", top=2) == "no headings"


def _params(model):
    return {k: v for k, v in model.state_dict().items() if v.is_floating_point()}


def _differs(a, b):
    return any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 3])
def test_run_report_compares_a_baseline_trained_from_the_same_pruned_student(processes, tmp_path, monkeypatch):
    """processes: the run as if it had finetuned on that many processes (its summary says so), so
    that the wall-clock baseline must get the run's training seconds on all of them."""
    import dataclasses

    import nni_2ndmatch.job.run as job_run
    from nni_2ndmatch import finetune, get_finetuner, load_pruned
    from nni_2ndmatch.data import DigitsDataset
    from nni_2ndmatch.job.inputs import load_configured_model
    from nni_2ndmatch.job.run import run_job
    from nni_2ndmatch.scoped import torch_threads

    raw = {"model": {"teacher": {"builtin": "digits-teacher"}}, "data": {"builtin": "digits", "resolution": 8},
           "pruning": {"pruner": "magnitude", "sparse_ratio": 0.5},
           "finetune": {"finetuner": "2ndmatch", "steps": 2, "batch_size": 8, "lr": 5e-4, "lambda_kd": 0.5,
                        "lambda_jac": 0.001, "log_every": 1, "checkpoint_every": 2},
           "evaluate": {"samples": 8, "ddim_steps": 2, "compare": [{"finetuner": "kd", "kd_perturb": "noise"}],
                        "equal_wallclock": True},
           "output_dir": str(tmp_path / "run")}
    config = validate_config(raw)
    evaluate_models = job_run.evaluate_models
    monkeypatch.setattr(job_run, "evaluate_models", lambda *args, **kwargs: evaluate_models(
        *args[:5], dataclasses.replace(args[5], processes=processes,
                                       process_seconds=args[5].process_seconds * processes), **kwargs))
    run_job(config, "run", progress=False)
    out = tmp_path / "run"
    report = out / "report"
    results = json.loads((report / "results.json").read_text())
    comparison = results["comparison"]
    run = results["finetune"]  # the run's seconds less its checkpoints' (the baselines write none)
    training = run["seconds"] - run["overhead_seconds"]
    assert 0 < run["overhead_seconds"] < run["seconds"]
    kd_steps = round(training * processes / (comparison["baselines"]["kd"]["seconds"] / 2))
    wallclock = "the run's wall clock" + (f" x {processes} processes" if processes > 1 else "")
    assert [row["model"] for row in comparison["rows"]] == [
        "teacher", "pruned, before finetuning", "kd with kd_perturb noise (baseline)",
        f"kd with kd_perturb noise (baseline, {kd_steps} steps: {wallclock})", "2ndmatch (this run)"]
    assert any(f"times its {processes} processes" in note for note in comparison["notes"]) == (processes > 1)
    assert comparison["baselines"]["kd-wallclock"]["steps"] == kd_steps > 2  # kd's step is the cheaper
    rows = {row["role"]: row for row in comparison["rows"]}
    assert rows["baseline"]["finetuner"] == "kd" and rows["baseline"]["finetune_seconds"] > 0
    assert rows["run"]["finetune_seconds"] == pytest.approx(training)
    assert math.isfinite(rows["baseline"]["digits_fid"]) and rows["baseline"]["fidelity"] > 0
    assert rows["teacher"]["fidelity"] == 0 and rows["run"]["fidelity"] == results["quality"]["fidelity"]
    options = comparison["baselines"]["kd"]["finetuner_options"]
    assert (options["lambda_kd"], options["kd_perturb"]) == (0.5, "noise")  # the run's lambda_kd, its own kd_perturb

    start, student = _params(load_pruned(out / "pruned")), _params(load_pruned(out / "student"))
    kd = _params(load_pruned(out / comparison["baselines"]["kd"]["student_dir"]))
    assert start.keys() == kd.keys() == student.keys()  # one architecture
    assert _differs(start, kd) and _differs(start, student) and _differs(kd, student)
    # the same start, loop options and threads: kd finetuned here from out/pruned reproduces the baseline exactly
    teacher = load_configured_model(config.model.teacher, "teacher")
    with torch_threads(config.resolved_threads()):  # float sums depend on the thread count
        again = finetune(load_pruned(out / "pruned"), teacher, get_finetuner("kd", lambda_dsm=1.0, lambda_kd=0.5,
                                                                                 kd_perturb="noise"),
                         DigitsDataset(8), config.finetune.train_config(), None, watch=Watch(progress=False)).student
    assert not _differs(_params(again), kd)
    assert not (report / "baselines" / "kd" / "checkpoints").exists()

    text = (report / "report.md").read_text()
    assert [line for line in text.splitlines() if line.startswith("# ")] == ["# nni-2ndmatch run report"]
    assert "| kd with kd_perturb noise (baseline) |" in text
    assert "`2ndmatch` vs kd with kd_perturb noise (baseline):" in text
    assert f"`2ndmatch` vs kd with kd_perturb noise (baseline, {kd_steps} steps: {wallclock}):" in text
    assert "benchmarks/digits_quality.py" in text and "the equal-compute experiment" in text
    for png in ("loss_curves.png", "samples_pruned.png", "samples_baseline_kd.png", "samples_student.png"):
        assert (report / png).stat().st_size > 1000, png


@pytest.mark.parametrize("processes, steps", [(1, 16), (4, 64)])
def test_a_wallclock_baseline_gets_the_runs_training_time_on_all_its_processes(processes, steps):
    """A baseline trains on one process: at equal wall clock it gets the run's training seconds
    (less checkpoints) times the run's processes, so that a run on 4 GPUs is not compared with a
    baseline given a quarter of the hardware."""
    from nni_2ndmatch.job.evaluate import _wallclock
    from nni_2ndmatch.job.results import RunSummary

    summary = RunSummary(finetuner="2ndmatch", finetuner_options={}, train_config={}, steps=10, seconds=10.0,
                         final={}, teacher_params=2, student_params=1, processes=processes, overhead_seconds=2.0)
    assert summary.equal_time_steps(0.5) == steps
    assert summary.equal_time_steps(1e6) == 1  # never zero steps
    assert _wallclock(processes) == ("the run's wall clock" if processes == 1 else
                                     f"the run's wall clock x {processes} processes")


def test_model_sizes_are_two_panels_with_each_models_size_and_the_ratio(tmp_path):
    from PIL import Image

    from nni_2ndmatch.job.report import model_sizes_figure, save_model_sizes

    models = {"teacher": {"macs": 16.2e6, "params": 1.1e6}, "student": {"macs": 4.3e6, "params": 0.3e6}}
    fig = model_sizes_figure(models)
    (macs, params) = fig.axes
    assert [b.get_height() for b in macs.patches] == pytest.approx([16.2, 4.3])  # millions, teacher first
    assert [b.get_height() for b in params.patches] == pytest.approx([1.1, 0.3])
    assert macs.get_title().endswith(f"student / teacher = {4.3 / 16.2:.3f}")
    assert params.get_title().endswith(f"student / teacher = {0.3 / 1.1:.3f}")
    assert [t.get_text() for t in macs.texts] == ["16.2M", "4.3M"]
    save_model_sizes(tmp_path / "macs.png", models)
    with Image.open(tmp_path / "macs.png") as image:
        assert image.format == "PNG" and image.width > 1.5 * image.height  # side by side


def test_report_embeds_the_latency_document_as_an_h2_section(tmp_path):
    from nni_2ndmatch.job.report import write_report

    latency = {"markdown": "# Latency: dense teacher vs pruned student\n\n| a | b |\n", "rows": []}
    text = write_report(tmp_path, {"latency": latency}).read_text()
    headings = [line for line in text.splitlines() if line.startswith("#")]
    assert headings == ["# nni-2ndmatch run report", "## Latency: dense teacher vs pruned student"]
    assert "![MACs and parameters](macs.png)" in text


@pytest.mark.slow
def test_fid_with_a_local_feature_network_is_reported_for_pixel_space_models_too(tmp_path):
    pytest.importorskip("torchmetrics")
    from helpers.tiny_models import tiny_feature_onnx

    from nni_2ndmatch.config import validate_config
    from nni_2ndmatch.job.run import run_job

    tiny_feature_onnx(tmp_path / "features.onnx")
    raw = {"version": 1, "model": {"teacher": {"builtin": "tiny-unet"}}, "data": {"builtin": "digits", "resolution": 8},
           "pruning": {"pruner": "magnitude"}, "finetune": {"finetuner": "kd", "steps": 2, "batch_size": 4},
           "evaluate": {"samples": 6, "ddim_steps": 2, "fid_features": str(tmp_path / "features.onnx")},
           "output_dir": str(tmp_path / "run")}
    run_job(validate_config(raw), "run", progress=False)
    quality = json.loads((tmp_path / "run" / "report" / "results.json").read_text())["quality"]
    assert quality["fid_teacher"] > 0 and quality["fid_student"] > 0 and quality["digits_fid_student"] > 0


def test_a_baseline_that_cannot_train_with_the_runs_weights_is_refused_before_the_run(tmp_path):
    """The kd baseline takes the run's lambda_dsm and lambda_kd: both 0 (a pure Jacobian-matching
    run) would give it a zero loss; refused before anything is written, not after training. So is
    a baseline's option that would do nothing in the run (as the run's own would be)."""
    from nni_2ndmatch.errors import UserError
    from nni_2ndmatch.job.inputs import check_evaluate, load_configured_model
    from nni_2ndmatch.job.run import run_job

    raw = {"model": {"teacher": {"builtin": "tiny-unet"}}, "data": {"builtin": "digits", "resolution": 8},
           "pruning": {"pruner": "magnitude", "sparse_ratio": 0.5},
           "finetune": {"finetuner": "2ndmatch", "steps": 2, "batch_size": 4, "lambda_dsm": 0.0, "lambda_kd": 0.0,
                        "lambda_jac": 0.1},
           "evaluate": {"samples": 8, "ddim_steps": 2, "compare": ["kd"]}, "output_dir": str(tmp_path / "run")}
    with pytest.raises(UserError, match=r"evaluate.compare\[0\]: the baseline 'kd' takes the options \{'lambda_dsm': "
                                        r"0.0, 'lambda_kd': 0.0\} \(the run's lambda_dsm / lambda_kd and its own\), "
                                        r"which it cannot train with: every loss weight is 0"):
        run_job(validate_config(raw), "run", progress=False)
    assert not (tmp_path / "run").exists()
    teacher = load_configured_model(validate_config(raw).model.teacher, "teacher")
    raw["evaluate"]["compare"] = [{"finetuner": "kd", "lambda_kd": 1.0}]  # its own weight: it can train
    check_evaluate(validate_config(raw), teacher, None)
    # what the baseline's options would do in this run is checked too, as the run's own are
    raw["finetune"] = {"finetuner": "kd", "steps": 2, "batch_size": 4, "gradient_checkpointing": True}
    for given, refusal in (({"jac_every": 3}, r"jac_every=3 is not allowed: with steps 2: the Jacobian term would "
                                              r"never be computed; allowed: 1 to 2"),
                           ({"jac_min_timestep": 1000}, r"jac_min_timestep=1000 is not allowed: the teacher's "
                                                        r"schedule has timesteps below 1000"),
                           ({"mode": "jvp"}, r"gradient_checkpointing=True is not allowed with mode 'jvp'")):
        raw["evaluate"]["compare"] = [{"finetuner": "2ndmatch", **given}]
        with pytest.raises(UserError, match=r"evaluate\.compare\[0\]: the baseline '2ndmatch' takes the options .*"
                                            r"which it cannot train with: " + refusal):
            check_evaluate(validate_config(raw), teacher, None)


@pytest.mark.slow
def test_a_wallclock_baseline_whose_steps_would_never_reach_its_jac_every_is_left_out_with_a_note(tmp_path,
                                                                                                  monkeypatch):
    from nni_2ndmatch.job.results import RunSummary
    from nni_2ndmatch.job.run import run_job

    monkeypatch.setattr(RunSummary, "equal_time_steps", lambda self, seconds_per_step: 1)
    raw = {"model": {"teacher": {"builtin": "tiny-unet"}}, "data": {"builtin": "digits", "resolution": 8},
           "pruning": {"pruner": "magnitude", "sparse_ratio": 0.5},
           "finetune": {"finetuner": "kd", "steps": 2, "batch_size": 4},
           "evaluate": {"samples": 4, "ddim_steps": 2, "equal_wallclock": True,
                        "compare": ["dsm", {"finetuner": "2ndmatch", "jac_every": 2}]},
           "output_dir": str(tmp_path / "run")}
    run_job(validate_config(raw), "run", progress=False)
    comparison = json.loads((tmp_path / "run" / "report" / "results.json").read_text())["comparison"]
    assert sorted(comparison["baselines"]) == ["2ndmatch", "dsm", "dsm-wallclock"]
    assert comparison["baselines"]["dsm-wallclock"]["steps"] == 1
    assert "2ndmatch with jac_every 2 was not trained for the run's wall clock, which buys it fewer steps (1) than " \
           "its jac_every (2): its term would never be computed." in comparison["notes"]


def test_a_baseline_trains_with_the_options_compare_gives_it_over_the_runs_weights():
    """``{finetuner: 2ndmatch, OPTION: VALUE}`` in evaluate.compare: the baseline is that strategy
    with those options, the run's lambda_dsm / lambda_kd where it gives none, and nothing else of
    the run's; it trains exactly as the same finetuner built by hand."""
    from nni_2ndmatch import finetune, get_finetuner
    from nni_2ndmatch.data import DigitsDataset
    from nni_2ndmatch.job.evaluate import baseline_label, finetune_baseline
    from nni_2ndmatch.models import tiny_unet

    raw = {"model": {"teacher": {"builtin": "tiny-unet"}}, "data": {"builtin": "digits", "resolution": 8},
           "pruning": {"pruner": "magnitude"}, "finetune": {"finetuner": "kd", "steps": 2, "batch_size": 4,
                                                            "lambda_kd": 0.5, "kd_perturb": "noise"},
           "evaluate": {"compare": [{"finetuner": "2ndmatch", "jac_match": "vector", "lambda_jac": 0.01,
                                     "lambda_dsm": 0.25}]}, "output_dir": "unused"}
    config = validate_config(raw)
    (name, given), = config.evaluate.baselines()
    torch.manual_seed(0)
    teacher, start = tiny_unet(), tiny_unet()
    student, info = finetune_baseline(name, start, teacher, DigitsDataset(8), config,
                                      config.finetune.options.model_dump(), progress=False, given=given)
    options = info["finetuner_options"]
    assert (options["jac_match"], options["lambda_jac"], options["lambda_dsm"], options["lambda_kd"]) == (
        "vector", 0.01, 0.25, 0.5)  # its own, its own over the run's, the run's
    by_hand = finetune(copy.deepcopy(start), teacher, get_finetuner("2ndmatch", jac_match="vector", lambda_jac=0.01,
                                                                    lambda_dsm=0.25, lambda_kd=0.5),
                       DigitsDataset(8), config.finetune.train_config(), None, watch=Watch(progress=False)).student
    assert not _differs(_params(by_hand), _params(student)) and _differs(_params(start), _params(student))
    assert baseline_label(name, given) == "2ndmatch with jac_match vector, lambda_jac 0.01, lambda_dsm 0.25"
    assert baseline_label("kd", {}) == "kd"
