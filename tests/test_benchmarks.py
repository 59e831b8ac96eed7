"""The quality benchmarks' own logic: paired statistics against scipy, the arms, the equal-compute
budget, and a tiny end-to-end run of digits_quality.py with it."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from benchmarks.arms import PAPER, arm, parse_arms
from benchmarks.paired_stats import holm, paired, stratified

DIFFS = [1.2, -0.4, 2.5, 0.9, 1.7, -0.1, 0.6, 3.0]


def test_paired_statistics_match_scipy():
    got = paired(DIFFS)
    t = stats.ttest_rel(DIFFS, [0.0] * len(DIFFS))
    assert got["t"] == pytest.approx(t.statistic) and got["p_two_sided"] == pytest.approx(t.pvalue)
    assert got["p_one_sided"] == pytest.approx(stats.ttest_1samp(DIFFS, 0.0, alternative="greater").pvalue)
    assert got["p_wilcoxon"] == pytest.approx(stats.wilcoxon(DIFFS, alternative="greater").pvalue)
    low, high = stats.t.interval(0.95, len(DIFFS) - 1, loc=np.mean(DIFFS), scale=stats.sem(DIFFS))
    assert got["ci95"] == pytest.approx([low, high])
    assert (got["n"], got["wins"]) == (8, 6) and got["std"] == pytest.approx(np.std(DIFFS, ddof=1))


def test_stratified_pools_strata_by_their_pairs_and_their_own_variances():
    a, b = DIFFS, [-0.5, 0.3, 0.1, -0.2]
    got = stratified({"a": a, "b": b})
    w = np.array([8, 4]) / 12
    means = np.array([np.mean(a), np.mean(b)])
    parts = w ** 2 * np.array([np.var(a, ddof=1) / 8, np.var(b, ddof=1) / 4])
    df = parts.sum() ** 2 / (parts[0] ** 2 / 7 + parts[1] ** 2 / 3)
    t = (w @ means) / math.sqrt(parts.sum())
    assert got["mean"] == pytest.approx(w @ means) and got["t"] == pytest.approx(t) and got["df"] == pytest.approx(df)
    assert got["p_one_sided"] == pytest.approx(stats.t.sf(t, df))
    assert got["strata"]["b"] == paired(b)
    # one stratum: the paired t test itself
    alone = stratified({"a": a})
    assert alone["t"] == pytest.approx(paired(a)["t"]) and alone["p_one_sided"] == pytest.approx(
        paired(a)["p_one_sided"]) and alone["ci95"] == pytest.approx(paired(a)["ci95"])
    # a stratum shifted as a whole changes the pooled mean but not its standard error
    shifted = stratified({"a": a, "b": [x + 5 for x in b]})
    assert shifted["se"] == pytest.approx(got["se"]) and shifted["mean"] == pytest.approx(got["mean"] + 5 / 3)
    with pytest.raises(ValueError, match=r"strata \{'b': 1\} have fewer than 2 pairs"):
        stratified({"a": a, "b": [0.3]})


def test_holm_steps_down():
    assert holm({"a": 0.01, "b": 0.04, "c": 0.03}) == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06})
    assert holm({"a": 0.6, "b": 0.5}) == {"a": 1.0, "b": 1.0}
    for family in ({"a": math.nan, "b": 0.01, "c": 0.02}, {"b": 0.01, "c": 0.02, "a": math.nan}):  # in any order
        assert holm(family) == pytest.approx({"a": 1.0, "b": 0.03, "c": 0.04})


def test_arms_by_name():
    assert arm("kd-perturb", {}) == ("kd", {"kd_perturb": "noise"})
    assert arm("2ndmatch-every4", {"lambda_jac": 1.0}) == ("2ndmatch", {"lambda_jac": 1.0, "jac_every": 4})
    assert arm("2ndmatch", {"lambda_jac": 1.0}) == ("2ndmatch", {"lambda_jac": 1.0})
    assert arm("2ndmatch-paper", {"lambda_jac": 1.0, "jac_match": "vector"}) == ("2ndmatch", PAPER)
    for bad in ("2ndmatch-every0", "kd-perturbed", "2ndmatch-every"):
        with pytest.raises(ValueError, match=rf"arm '{bad}' is unknown; allowed: dsm, kd, kd-perturb"):
            arm(bad, {})
    with pytest.raises(ValueError, match="each arm once"):
        parse_arms("kd,kd")


def _cost(tmp_path, ratios, **measured):
    path = tmp_path / "cost.json"
    path.write_text(json.dumps({"commit": "abc", **measured, "data": {"digits": {"arms": {
        name: {"vs_kd": r} for name, r in ratios.items()}}}}))
    return path


def test_equal_compute_gives_each_arm_the_steps_of_the_most_expensive_ones_budget(tmp_path):
    from benchmarks.digits_quality import equal_compute_budget, parse_args

    cost = _cost(tmp_path, {"kd": 1.0, "kd-perturb": 1.4, "2ndmatch": 2.0, "2ndmatch-every8": 1.2})
    args = parse_args(["--steps", "300", "--finetuners", "kd,2ndmatch", "--budget", "equal-compute",
                       "--compute-arms", "kd,kd-perturb,2ndmatch-every8", "--cost", str(cost)])
    budget, ratio = equal_compute_budget(args)
    assert budget["reference_arm"] == "kd-perturb" and ratio["kd-perturb"] == 1.4
    assert budget["steps"] == {"kd": 420, "kd-perturb": 300, "2ndmatch-every8": 350}
    args.compute = ["kd", "2ndmatch-every4"]
    with pytest.raises(SystemExit, match="no digits cost for 2ndmatch-every4"):
        equal_compute_budget(args)
    # the cost of another thread count, or of the 2ndmatch arms with other Jacobian options, is refused
    variant = {"jac_match": "vector", "jac_weighting": "noise", "lambda_jac": 1.0, "jac_reference_dims": 1}
    cost = _cost(tmp_path, {"kd": 1.0, "kd-perturb": 1.1, "2ndmatch": 2.0}, threads=1, variant=variant)
    argv = ["--steps", "300", "--budget", "equal-compute", "--threads", "1", "--compute-arms", "kd,2ndmatch",
            "--jac-match", "vector", "--jac-weighting", "noise", "--lambda-jac", "1.0", "--jac-reference-dims", "1",
            "--cost", str(cost)]
    assert equal_compute_budget(parse_args(argv))[0]["steps"] == {"kd": 600, "2ndmatch": 300}
    for change, message in ((["--threads", "2"], r"measured with threads 1 \(this run: 2\)"),
                            (["--jac-match", "norm"], r"measured with jac_match 'vector' \(this run: 'norm'\)"),
                            (["--jac-min-timestep", "200"], r"jac_min_timestep 0 \(this run: 200\)")):
        with pytest.raises(SystemExit, match=message):
            equal_compute_budget(parse_args([*argv, *change]))
    # without a 2ndmatch arm the Jacobian options are not the cost's business
    args = parse_args([*argv, "--jac-match", "norm", "--compute-arms", "kd,kd-perturb"])
    assert equal_compute_budget(args)[0]["steps"] == {"kd": 330, "kd-perturb": 300}


@pytest.mark.slow
def test_digits_quality_at_equal_compute_writes_budget_ratios_and_paired_statistics(tmp_path, monkeypatch):
    from benchmarks import digits_quality

    cost = _cost(tmp_path, {"kd": 1.0, "kd-perturb": 1.1, "2ndmatch": 2.0})
    argv = ["--steps", "2", "--batch-size", "2", "--seeds", "5,6", "--samples", "16", "--ddim-steps", "2",
            "--finetuners", "kd,2ndmatch", "--budget", "equal-compute", "--compute-arms", "kd,kd-perturb,2ndmatch",
            "--cost", str(cost), "--threads", "1", "--eval-noise-draws", "2", "--out", str(tmp_path / "q.json")]
    monkeypatch.setattr(sys, "argv", ["digits_quality.py", *argv])
    results = digits_quality.main(digits_quality.parse_args(argv))
    stored = json.loads((tmp_path / "q.json").read_text())
    assert stored["settings"]["cost_ratio"] == {"kd": 1.0, "kd-perturb": 1.1, "2ndmatch": 2.0}
    assert stored["settings"]["budget"]["steps"] == {"kd": 4, "kd-perturb": 4, "2ndmatch": 2}
    steps = {(r["strategy"], r["seed"]): r["steps"] for r in stored["equal_compute"]["runs"]}
    assert steps == {("kd", 5): 4, ("kd-perturb", 5): 4, ("2ndmatch", 5): 2, ("kd", 6): 4, ("kd-perturb", 6): 4,
                     ("2ndmatch", 6): 2}
    for key in ("paired", "paired_fidelity"):
        d = stored["equal_compute"][key]["kd_minus_2ndmatch"]
        assert set(d) == {"n", "mean", "std", "t", "p_one_sided", "p_two_sided", "p_wilcoxon", "wins", "ci95"}
        runs = {(r["strategy"], r["seed"]): r[{"paired": "fid", "paired_fidelity": "fidelity"}[key]]
                for r in stored["equal_compute"]["runs"]}
        assert d["mean"] == pytest.approx(np.mean([runs[("kd", s)] - runs[("2ndmatch", s)] for s in (5, 6)]))
    # the 2ndmatch run at equal compute is the equal-steps one (same steps): not trained twice
    assert [r for r in stored["equal_compute"]["runs"] if r["strategy"] == "2ndmatch"] == \
        [r for r in stored["equal_steps"]["runs"] if r["strategy"] == "2ndmatch"]
    assert stored["teacher_sha256"] and stored["cpu"] and all(r["commit"] for r in stored["equal_steps"]["runs"])
    assert results["equal_compute"]["strategies"]["kd"]["steps"] == 4
    noise = stored["evaluation_noise"]
    assert set(noise["fid"]) == {"kd", "2ndmatch"} and len(noise["fid"]["kd"]) == 2
    assert noise["std_kd_minus"]["2ndmatch"] == pytest.approx(abs(np.subtract(*noise["fid"]["kd"]) - np.subtract(
        *noise["fid"]["2ndmatch"])) / math.sqrt(2))


def _teacher_json(path, seeds, gains, commit="c0", paper=False, spread=None):
    """A digits_quality.py equal-compute JSON whose arms beat kd by ``gains`` (+ seeded noise);
    ``paper``: 2ndmatch-paper beside them at equal steps, worse than kd there by 0.5; ``spread``:
    the arms' differences from kd are exactly ``gains`` + ``spread[arm]`` x a fixed vector of mean 0
    and sample standard deviation 1 (no seeded noise)."""
    rng = np.random.default_rng(len(seeds))
    unit = np.arange(len(seeds)) - (len(seeds) - 1) / 2
    unit = unit / unit.std(ddof=1)
    steps = {"kd": 600, "kd-perturb": 580, "2ndmatch": 300, "2ndmatch-every8": 500}
    runs = {"equal_steps": [], "equal_compute": []}
    for i, s in enumerate(seeds):
        kd = 20 + rng.normal()
        runs["equal_steps"] += [{"strategy": "kd", "seed": s, "fid": kd + 1, "fidelity": 0.2, "commit": commit},
                                {"strategy": "2ndmatch", "seed": s, "fid": kd + 0.2 * rng.normal(), "fidelity": 0.1,
                                 "commit": commit}]
        if paper:
            runs["equal_steps"].append({"strategy": "2ndmatch-paper", "seed": s, "fid": kd + 1.5 + 0.3 * rng.normal(),
                                        "fidelity": 0.2, "commit": commit})
        noise = {name: 0.3 * rng.normal() if spread is None else spread.get(name, 0.0) * unit[i]
                 for name in steps}
        runs["equal_compute"] += [{"strategy": name, "seed": s, "fid": kd - gains.get(name, 0.0) + noise[name],
                                   "fidelity": 0.2 - 0.01 * gains.get(name, 0.0), "commit": commit, "steps": n}
                                  for name, n in steps.items()]
    for row in runs["equal_steps"]:
        row["steps"] = 300
    path.write_text(json.dumps({"settings": {"seeds": ",".join(map(str, seeds)), "steps": 300,
                                             "budget": {"kind": "equal-compute", "steps": steps},
                                             "cost_ratio": {"kd": 1.0}, "samples": 8000, "lr": 2e-4},
                                "teacher_sha256": "x",
                                **{budget: {"runs": rows} for budget, rows in runs.items()}}))
    return str(path)


@pytest.mark.slow
def test_the_verdict_applies_the_committed_rule(tmp_path):
    from benchmarks import equal_compute_verdict as verdict

    gains = {"kd-perturb": 2.0, "2ndmatch": 0.5}
    files = [_teacher_json(tmp_path / f"{name}.json", range(100, 100 + n), gains)
             for name, n in (("digits", 12), ("dequantized", 12), ("mnist", 8))]
    got = verdict.main(verdict.parse_args([*files, "--commit", "c0", "--out", str(tmp_path / "v.json")]))
    d = got["decisions"]
    assert d["kd-perturb"]["recommended_over_kd"] and got["recommended"] == "kd-perturb"
    assert not d["2ndmatch"]["recommended_over_kd"]  # significant, perhaps, but under the 1.0 gain
    assert not d["2ndmatch-every8"]["recommended_over_kd"] and d["2ndmatch-every8"]["not_worse_than_kd"]
    assert set(got["equal_compute"]["paired"]["kd_minus_kd-perturb"]["strata"]) == {"digits", "dequantized", "mnist"}
    raw = {k: got["equal_compute"]["paired"][f"kd_minus_{k}"]["p_one_sided"] for k in d}
    assert {k: v["p_one_sided_holm"] for k, v in d.items()} == pytest.approx(holm(raw))
    # a gain on two teachers only is not recommended, however large
    files[2] = _teacher_json(tmp_path / "mnist.json", range(100, 108), {"kd-perturb": -1.0})
    got = verdict.main(verdict.parse_args([*files, "--commit", "c0", "--out", str(tmp_path / "v.json")]))
    assert got["recommended"] == "kd" and not got["decisions"]["kd-perturb"]["positive_on_every_teacher"]
    # runs of another commit, or too few seeds, are refused
    with pytest.raises(SystemExit, match="not c1"):
        verdict.main(verdict.parse_args([*files, "--commit", "c1", "--out", str(tmp_path / "v.json")]))
    # a run recorded twice, a run of other steps than its budget's, teachers of different arms: refused
    rows = json.loads(open(files[1]).read())
    bad = tmp_path / "bad"
    bad.mkdir()
    for change, message in ((lambda r: r["equal_compute"]["runs"].append(r["equal_compute"]["runs"][0]),
                             r"equal_compute holds a run twice, e.g. \('kd', 100\)"),
                            (lambda r: r["equal_steps"]["runs"][0].update(steps=7),
                             "equal_steps run kd seed 100 has 7 steps, not its budget's"),
                            (lambda r: r["equal_compute"]["runs"].append(dict(r["equal_compute"]["runs"][0], seed=999)),
                             r"equal_compute has runs of seed\(s\) 999, not among its settings' seeds"),
                            (lambda r: r["settings"]["budget"]["steps"].pop("kd-perturb") and r["equal_compute"].update(
                                runs=[x for x in r["equal_compute"]["runs"] if x["strategy"] != "kd-perturb"]),
                             "the teachers ran different arms at equal compute")):
        edited = json.loads(json.dumps(rows))
        change(edited)
        (bad / "dequantized.json").write_text(json.dumps(edited))
        with pytest.raises(SystemExit, match=message):
            verdict.main(verdict.parse_args([files[0], str(bad / "dequantized.json"), files[2], "--commit", "c0",
                                             "--out", str(tmp_path / "v.json")]))
    with pytest.raises(SystemExit, match="two have the same file name"):  # one teacher twice, from two folders
        verdict.main(verdict.parse_args([files[0], str(bad / "dequantized.json"), files[1], "--commit", "c0"]))
    # one teacher pinned at its own commit
    files[2] = _teacher_json(tmp_path / "mnist.json", range(100, 108), gains, commit="c2")
    with pytest.raises(SystemExit, match="mnist.json: equal_steps has runs of commit.s. c2, not c0"):
        verdict.main(verdict.parse_args([*files, "--commit", "c0", "--out", str(tmp_path / "v.json")]))
    got = verdict.main(verdict.parse_args([*files, "--commit", "c0", "--commit", "mnist=c2",
                                           "--out", str(tmp_path / "v.json")]))
    assert got["commits"] == {"digits": "c0", "dequantized": "c0", "mnist": "c2"}
    with pytest.raises(SystemExit, match="TEACHER among digits, dequantized, mnist"):
        verdict.main(verdict.parse_args([*files, "--commit", "c0", "--commit", "cifar=c2"]))
    with pytest.raises(SystemExit, match="no commit for dequantized, digits"):
        verdict.main(verdict.parse_args([*files, "--commit", "mnist=c2"]))
    files[0] = _teacher_json(tmp_path / "digits.json", range(100, 110), gains)
    with pytest.raises(SystemExit, match="10 seeds; the rule asks for at least 12"):
        verdict.main(verdict.parse_args([*files, "--commit", "c0", "--out", str(tmp_path / "v.json")]))
    # one teacher with the paper's form beside the variant at equal steps: both reported, Holm over the two
    one = _teacher_json(tmp_path / "flow.json", range(200, 210), gains, paper=True)
    args = [one, "--commit", "c0", "--min-seeds", "10", "--out", str(tmp_path / "f.json")]
    with pytest.raises(SystemExit, match=r"equal_steps lacks 10 run\(s\), e.g. \('2ndmatch-paper', 200\)"):
        verdict.main(verdict.parse_args([_teacher_json(tmp_path / "no_paper.json", range(200, 210), gains), *args[1:],
                                         "--equal-steps-arms", "2ndmatch,2ndmatch-paper"]))
    got = verdict.main(verdict.parse_args([*args, "--equal-steps-arms", "2ndmatch,2ndmatch-paper"]))
    steps = got["equal_steps"]
    assert steps["significant"] == ["2ndmatch"]  # the paper's form is worse than kd here
    assert "on this one teacher: **kd-perturb**" in (tmp_path / "f.md").read_text()
    assert set(steps["paired"]) == {"kd_minus_2ndmatch", "kd_minus_2ndmatch-paper"}
    assert steps["paired"]["kd_minus_2ndmatch-paper"]["mean"] < 0 < steps["paired"]["kd_minus_2ndmatch"]["mean"]
    assert steps["p_one_sided_holm"] == pytest.approx(holm({k.removeprefix("kd_minus_"): v["p_one_sided"]
                                                            for k, v in steps["paired"].items()}))


@pytest.mark.slow
def test_the_verdict_holds_every_condition_of_the_rule(tmp_path, capsys):
    from benchmarks import equal_compute_verdict as verdict

    def run(gains, spread, edit=None, *extra):
        files = []
        for name, n in (("digits", 12), ("dequantized", 12), ("mnist", 8)):
            files.append(_teacher_json(tmp_path / f"{name}.json", range(100, 100 + n), gains, spread=spread))
            if edit and name == "mnist":
                rows = json.loads(Path(files[-1]).read_text())
                edit(rows)
                Path(files[-1]).write_text(json.dumps(rows))
        return verdict.main(verdict.parse_args([*files, "--commit", "c0", "--out", str(tmp_path / "v.json"), *extra]))

    # kd-perturb gains 1.2 on every teacher at a raw one-sided p under 0.05 that Holm's x3 lifts above it;
    # the variant's interval reaches below the margin although its mean (-0.5) and upper end lie above it
    got = run({"kd-perturb": 1.2, "2ndmatch": -0.5}, {"kd-perturb": 3.5, "2ndmatch": 3.0, "2ndmatch-every8": 1.0})
    perturb, variant = got["decisions"]["kd-perturb"], got["decisions"]["2ndmatch"]
    raw = got["equal_compute"]["paired"]["kd_minus_kd-perturb"]["p_one_sided"]
    assert 0.05 / 3 < raw < 0.05 < perturb["p_one_sided_holm"]
    assert perturb["gain"] == pytest.approx(1.2) and perturb["positive_on_every_teacher"]
    assert not perturb["recommended_over_kd"] and got["recommended"] == "kd"
    assert variant["ci95"][0] < -1.0 < variant["gain"] and not variant["not_worse_than_kd"]
    assert got["decisions"]["2ndmatch-every8"]["not_worse_than_kd"]
    # two settings pass: the larger gain is recommended (not the first by name)
    got = run({"kd-perturb": 3.0, "2ndmatch": 2.0}, {"kd-perturb": 0.5, "2ndmatch": 0.5})
    assert got["decisions"]["2ndmatch"]["recommended_over_kd"] and got["recommended"] == "kd-perturb"
    # teachers of another regime, a JSON of another budget, a rule without a variance: clear errors
    with pytest.raises(SystemExit, match=r"different settings.lr: digits 0.0002, dequantized 0.0002, mnist 0.001"):
        run({}, None, lambda r: r["settings"].update(lr=1e-3))
    with pytest.raises(SystemExit, match="mnist.json: settings.budget is equal-wallclock, not equal-compute"):
        run({}, None, lambda r: r["settings"]["budget"].update(kind="equal-wallclock"))
    for counts, message in (("12,12,1", "each value must be at least 2"), ("12,8", "give one count, or one per input")):
        with pytest.raises(SystemExit) as refused:
            run({}, None, None, "--min-seeds", counts)
        assert refused.value.code == 2 and f"--min-seeds {counts}: {message}" in capsys.readouterr().err


def _flow_teacher(folder, class_name="FlowMatchEulerDiscreteScheduler"):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from nni_2ndmatch.models import digits_unet

    torch.manual_seed(0)
    digits_unet().save_pretrained(folder, safe_serialization=True)
    config = {**FlowMatchEulerDiscreteScheduler(shift=1.0).config, "_class_name": class_name}
    (folder / "scheduler_config.json").write_text(json.dumps(config))
    return folder


def test_a_teacher_folder_with_a_scheduler_config_is_a_flow_matching_teacher(tmp_path):
    from benchmarks.arms import load_teacher

    teacher = load_teacher("digits", str(_flow_teacher(tmp_path / "flow")))
    assert type(teacher.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and teacher.scheduler.config.shift == 1
    assert load_teacher("digits").scheduler is None  # the shipped one: the reference DDPM schedule
    with pytest.raises(ValueError, match=r"scheduler_config.json: _class_name 'DDIMScheduler'; allowed: a flow"):
        load_teacher("digits", str(_flow_teacher(tmp_path / "ddim", "DDIMScheduler")))


@pytest.mark.slow
def test_digits_quality_trains_and_samples_a_flow_matching_teacher_by_its_objective(tmp_path, monkeypatch):
    """Every arm gets the teacher's flow-matching scheduler, the paper's arm its own options, and
    the models are sampled by the Euler flow sampler."""
    from benchmarks import digits_quality

    argv = ["--teacher", str(_flow_teacher(tmp_path / "flow")), "--steps", "2", "--batch-size", "2", "--seeds", "5",
            "--samples", "16", "--ddim-steps", "2", "--finetuners", "kd,2ndmatch-paper,2ndmatch", "--no-wallclock",
            "--lambda-jac", "1.0", "--jac-match", "vector", "--threads", "1", "--out", str(tmp_path / "q.json")]
    args = digits_quality.parse_args(argv)  # (its checks build each arm's finetuner too, with no teacher yet)
    built, sampled = [], []
    real_get, real_sample = digits_quality.get_finetuner, digits_quality.sample
    monkeypatch.setattr(digits_quality, "get_finetuner", lambda name, **kw: built.append((name, kw)) or real_get(
        name, **kw))
    monkeypatch.setattr(digits_quality, "sample", lambda *a: sampled.append(a[3]) or real_sample(*a))
    monkeypatch.setattr(sys, "argv", ["digits_quality.py", *argv])
    digits_quality.main(args)
    stored = json.loads((tmp_path / "q.json").read_text())
    assert {r["strategy"] for r in stored["equal_steps"]["runs"]} == {"kd", "2ndmatch-paper", "2ndmatch"}
    assert [name for name, _ in built] == ["kd", "2ndmatch", "2ndmatch"]
    assert all(type(kw["scheduler"]).__name__ == "FlowMatchEulerDiscreteScheduler" for _, kw in built)
    assert {k: built[1][1][k] for k in PAPER} == PAPER and built[2][1]["jac_match"] == "vector"
    assert sampled and all(type(s).__name__ == "FlowMatchEulerDiscreteScheduler" for s in sampled)
    assert stored["settings"]["teacher_sha256"] and "kd_minus_2ndmatch-paper" in stored["equal_steps"]["paired"]


@pytest.mark.slow
def test_digits_quality_resumes_a_run_cut_short_without_redoing_its_work(tmp_path, monkeypatch):
    """Cut short during the first seed's evaluation-noise draws, a rerun takes the teacher's samples,
    the pruned student's scores and the trained model from where the first run left them, and ends
    with the JSON an uninterrupted run writes."""
    from benchmarks import digits_quality

    def main(out):
        argv = ["--steps", "2", "--batch-size", "2", "--seeds", "5", "--samples", "16", "--ddim-steps", "2",
                "--finetuners", "kd,2ndmatch", "--no-wallclock", "--threads", "1", "--eval-noise-draws", "2",
                "--sample-batch", "5", "--out", str(out)]
        monkeypatch.setattr(sys, "argv", ["digits_quality.py", *argv])
        return digits_quality.main(digits_quality.parse_args(argv))

    whole = main(tmp_path / "whole.json")
    assert [p.name for p in (tmp_path / "whole.cache").iterdir()] == ["teacher_samples.safetensors"]

    calls = {"fid": 0, "train": [], "sampled": 0}
    real_fid, real_train, real_sample = (digits_quality.Benchmark.fid, digits_quality.Benchmark.train,
                                         digits_quality.sample)

    def fid(self, samples):  # dense, pruned, kd, kd's first draw, then cut short at kd's second draw
        calls["fid"] += 1
        if calls["fid"] == 5:
            raise KeyboardInterrupt
        return real_fid(self, samples)

    monkeypatch.setattr(digits_quality.Benchmark, "fid", fid)
    with pytest.raises(KeyboardInterrupt):
        main(tmp_path / "cut.json")
    cut = json.loads((tmp_path / "cut.json").read_text())
    assert not cut["equal_steps"]["runs"] and len(cut["evaluation_noise"]["fid"]["kd"]) == 1
    assert (tmp_path / "cut.cache" / "equal_steps-kd-5-2.safetensors").is_file()

    monkeypatch.setattr(digits_quality.Benchmark, "fid", real_fid)
    monkeypatch.setattr(digits_quality.Benchmark, "train",
                        lambda self, name, *a: calls["train"].append(name) or real_train(self, name, *a))
    monkeypatch.setattr(digits_quality, "sample", lambda *a: calls.__setitem__("sampled", calls["sampled"] + 1)
                        or real_sample(*a))
    resumed = main(tmp_path / "cut.json")
    # kd only evaluated and drawn once more; 2ndmatch trained, evaluated and drawn twice; no teacher or pruned
    assert calls["train"] == ["2ndmatch"] and calls["sampled"] == 2 + 3
    for key in ("dense", "pruned", "evaluation_noise"):
        assert resumed[key] == whole[key]
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in whole["equal_steps"]["runs"]]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in resumed["equal_steps"]["runs"]] == strip
    assert [p.name for p in (tmp_path / "cut.cache").iterdir()] == ["teacher_samples.safetensors"]


def test_the_benchmark_cache_serves_only_the_settings_that_wrote_it(tmp_path):
    from benchmarks.digits_quality import Cache

    Cache(tmp_path / "q.json", {"steps": 2}).save("x", {"t": torch.arange(3.0)}, seconds="1.5")
    tensors, meta = Cache(tmp_path / "q.json", {"steps": 2}).load("x")
    assert torch.equal(tensors["t"], torch.arange(3.0)) and meta["seconds"] == "1.5"
    assert Cache(tmp_path / "q.json", {"steps": 3}).load("x") is None
    (tmp_path / "q.cache" / "x.safetensors").write_bytes(b"cut short")
    assert Cache(tmp_path / "q.json", {"steps": 2}).load("x") is None


def _slot(seeds, runs_of, settings_seeds):
    """A digits_quality.py JSON of two arms per budget over ``seeds`` (runs as ``runs_of`` gives them)."""
    results = {"settings": {"seeds": settings_seeds, "steps": 30, "lr": 2e-4}, "teacher_sha256": "abc",
               "command": f"digits_quality.py --seeds {settings_seeds}", "commit": "c0ffee", "cpu": "cpu",
               "dense": {"fid_mean": 20.0}, "pruned": {"fid": 60.0, "fidelity": 0.3, "macs_ratio": 0.5}}
    for budget, arms in (("equal_steps", ("kd", "2ndmatch")), ("equal_compute", ("kd", "kd-perturb"))):
        results[budget] = {"runs": [runs_of(budget, name, seed) for seed in seeds for name in arms]}
    return results


def _run(budget, name, seed):
    fid = 30.0 + (seed % 7) * 0.9 + {"kd": 0.0, "2ndmatch": -0.8, "kd-perturb": 0.3}[name] + (seed % 3) * 0.2
    return {"strategy": name, "seed": seed, "steps": 30 if budget == "equal_steps" else {"kd": 60}.get(name, 50),
            "seconds": 1.0, "fid": fid, "fidelity": 0.1 + 0.01 * (seed % 5), "commit": "c0ffee"}


def test_two_slots_merged_equal_one_slot_over_every_seed(tmp_path, capsys):
    """The merge of a slot that ran the first seeds and one that ran the last ones, down, gives the
    summaries and paired statistics of one run over all of them; a run both made is kept once and its
    two scores recorded; a slot of other settings or other seeds is refused by name."""
    from benchmarks.digits_quality import summarize_budget
    from benchmarks.merge_seed_runs import main, merge

    seeds = [100, 101, 102, 103, 104]
    whole = _slot(seeds, _run, "100,101,102,103,104")
    for budget in ("equal_steps", "equal_compute"):
        summarize_budget(whole, budget)
    first = _slot([100, 101, 102], _run, whole["settings"]["seeds"])
    second = _slot([104, 103, 102], _run, "104,103,102")
    second["equal_steps"]["runs"][-1]["fid"] += 0.5  # the run both made (102, 2ndmatch), scored a little apart
    for path, results in (("a.json", first), ("b.json", second)):
        (tmp_path / path).write_text(json.dumps(results))
    merged = main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path / "m.json")])
    assert json.loads((tmp_path / "m.json").read_text()) == json.loads(json.dumps(merged))
    assert (tmp_path / "m.md").is_file()
    for budget in ("equal_steps", "equal_compute"):
        assert len(merged[budget]["runs"]) == 2 * len(seeds)
        for key in ("strategies", "paired", "paired_fidelity"):
            assert merged[budget][key] == whole[budget][key], (budget, key)  # the same runs in the same order
    assert merged["settings"]["seeds"] == "100,101,102,103,104"
    assert [(d["strategy"], d["seed"]) for d in merged["duplicates"]] == [("kd", 102), ("2ndmatch", 102),
                                                                           ("kd", 102), ("kd-perturb", 102)]
    assert merged["duplicates"][1]["fid"][1] - merged["duplicates"][1]["fid"][0] == pytest.approx(0.5)
    assert merged["merged_from"] == [{"file": "b.json", "command": second["command"], "commit": "c0ffee",
                                      "cpu": "cpu", "runs_added": 8}]
    assert "warning: equal_steps 2ndmatch seed 102 was run by two slots with other scores" in capsys.readouterr().err
    # merged again (a third slot): the earlier records stay
    third = _slot([104], _run, "104")
    (tmp_path / "c.json").write_text(json.dumps(third))
    again = main([str(tmp_path / "m.json"), str(tmp_path / "c.json"), "--out", str(tmp_path / "m2.json")])
    assert [(m["file"], m["runs_added"]) for m in again["merged_from"]] == [("b.json", 8), ("c.json", 0)]
    assert len(again["duplicates"]) == 4 + 4 and capsys.readouterr().err == ""  # the same scores, no warning

    other = _slot([104], _run, "104")
    other["settings"]["lr"] = 1e-3
    with pytest.raises(ValueError, match="settings differ from the first JSON's in lr"):
        merge(first, [("b", other)])
    with pytest.raises(ValueError, match=r"seeds \[105\] are not among"):
        merge(first, [("b", _slot([105], _run, "105"))])
    moved = _slot([104], _run, "104")
    moved["pruned"]["fid"] = 61.0
    with pytest.raises(ValueError, match="pruned fid is 61.0.*not the same start"):
        merge(first, [("b", moved)])
    (tmp_path / "moved.json").write_text(json.dumps(moved))
    for inputs, message in (([tmp_path / "a.json", tmp_path / "moved.json"], "not the same start"),
                            ([tmp_path / "a.json", tmp_path / "none.json"], "none.json: no such file")):
        with pytest.raises(SystemExit) as refused:  # from the command line: exit 2, nothing written
            main([*map(str, inputs), "--out", str(tmp_path / "refused.json")])
        assert refused.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "refused.json").exists()


@pytest.mark.slow
def test_run_cost_takes_the_median_of_interleaved_rounds_as_a_ratio_to_kd(tmp_path, monkeypatch, capsys):
    from benchmarks import run_cost

    seconds = {"kd": [10.0, 30.0, 12.0], "kd-perturb": [11.0, 13.0, 90.0], "2ndmatch-every2": [20.0, 25.0, 21.0]}
    order = []

    def fake(student, teacher, name, steps):  # the timed finetune, by arm and round
        order.append(name)
        return seconds[name][order.count(name) - 1]

    monkeypatch.setattr(run_cost, "run_seconds", fake)
    args = run_cost.parse_args(["--data", "digits", "--arms", "kd,kd-perturb,2ndmatch-every2", "--steps", "4",
                                "--out", str(tmp_path / "cost.json")])
    run_cost.main(args)
    assert order == ["kd", "kd-perturb", "2ndmatch-every2"] * 3  # interleaved within each round
    arms = json.loads((tmp_path / "cost.json").read_text())["data"]["digits"]["arms"]
    median = {n: a["median_seconds"] for n, a in arms.items()}
    assert median == {"kd": 12.0, "kd-perturb": 13.0, "2ndmatch-every2": 21.0}
    assert arms["kd-perturb"]["vs_kd"] == pytest.approx(13 / 12) and arms["kd"]["seconds"] == [10.0, 30.0, 12.0]
    for argv, message in ((["--arms", "kd,foo"], "--arms: arm 'foo' is unknown"),
                          (["--arms", "kd,2ndmatch-every8", "--steps", "4"], "2ndmatch-every8 applies its term every 8 "
                                                                                "steps, more than --steps 4"),
                          (["--data", "digits,cifar"], "'cifar' is not a teacher; allowed: digits, mnist")):
        with pytest.raises(SystemExit) as refused:
            run_cost.parse_args(argv)
        assert refused.value.code == 2 and message in capsys.readouterr().err


def test_a_benchmarks_record_names_its_command_quoted_this_checkouts_commit_and_the_cpu(monkeypatch):
    import subprocess

    from benchmarks import record

    monkeypatch.setattr(sys, "argv", ["anything.py", "--out", "a b.json", "--seeds", "1,2"])
    made = record.record("/somewhere/benchmarks/step_cost.py")
    assert made["command"] == "python benchmarks/step_cost.py --out 'a b.json' --seeds 1,2"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=record.ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=record.ROOT,
                           capture_output=True, text=True).stdout.strip()
    assert made["commit"] == head + ("+dirty" if dirty else "") and len(head) == 40
    assert made["cpu"]


@pytest.mark.slow
def test_a_step_time_benchmark_runs_to_its_json_with_its_command_commit_and_cpu(tmp_path, monkeypatch):
    """finetune_step_time.py (and jacobian_precision.py, its sibling) once failed at their very end,
    writing the command, after all their work."""
    from benchmarks import finetune_step_time

    argv = ["--device", "cpu", "--batch", "1", "--steps", "2", "--warmup", "0", "--rounds", "1", "--width", "0.25",
            "--variants", "kd", "--out", str(tmp_path / "t.json")]
    monkeypatch.setattr(sys, "argv", ["finetune_step_time.py", *argv])
    finetune_step_time.main(finetune_step_time.parse_args(argv))
    written = json.loads((tmp_path / "t.json").read_text())
    assert written["command"] == "python benchmarks/finetune_step_time.py " + " ".join(argv)
    assert {"commit", "cpu"} <= set(written) and [r["variant"] for r in written["rows"]] == ["kd"]


def test_data_loading_refuses_a_machine_without_the_photos_it_reads_before_any_work(monkeypatch, capsys):
    import importlib.util

    from benchmarks import data_loading

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "skimage" else find_spec(name, *a))
    with pytest.raises(SystemExit) as refused:
        data_loading.parse_args([])
    assert refused.value.code == 2 and "pip install scikit-image" in capsys.readouterr().err


@pytest.mark.parametrize(("script", "argv", "message"), [
    ("digits_quality", ["--finetuners", "kd,2ndmatch-every8", "--steps", "4", "--no-wallclock"],
     "2ndmatch-every8: with steps 4: the Jacobian term would never be computed"),
    ("digits_quality", ["--ema-decay", "1.5"], "--ema-decay 1.5 is not allowed: Input should be less than 1"),
    ("digits_quality", ["--lambda-jac", "-1"], "2ndmatch: lambda_jac=-1.0 is not allowed"),
    ("digits_quality", ["--ratio", "1.5"], "argument --ratio: 1.5 is not allowed: it must be between 0 and 1"),
    ("digits_quality", ["--seeds", "0,,1"], "--seeds '0,,1': give distinct non-negative integers"),
    ("digits_quality", ["--eval-noise-draws", "1"], "a spread needs at least 2 draws"),
    ("digits_quality", ["--cost", "other.json"], "--cost goes with --budget equal-compute"),
    ("digits_quality", ["--budget", "equal-compute", "--cost", "missing.json"], "--cost missing.json: no such file"),
    ("digits_quality", ["--budget", "equal-compute", "--no-wallclock"], "--no-wallclock goes with --budget "
                                                                        "equal-wallclock"),
    ("digits_quality", ["--baseline", "no/such.json"], "--baseline no/such.json: no such file"),
    ("step_cost", ["--variants", "dsm"], "'dsm' lacks kd"),
    ("step_cost", ["--variants", "kd,foo"], "foo is not allowed; choose from"),
    ("finetune_step_time", ["--rounds", "0"], "argument --rounds: 0 is not allowed: it must be >= 1"),
    ("data_scale", ["--sizes", "300"], "--sizes 300: give two or more sizes"),
    ("load", ["--images", "100"], "argument --images: 100 is not allowed: it must be >= 101"),
    ("run_cost", ["--teacher", "no/such/folder", "--data", "digits"], "is not a diffusers model folder"),
    ("jac_term_profile", ["--ratio", "0"], "must be between 0 and 1"),
    ("data_loading", ["--warmup", "0"], "argument --warmup: 0 is not allowed: it must be >= 1"),
    ("data_loading", ["--steps", "10", "--warmup", "10"], "--steps=10 must exceed --warmup=10"),
    ("jacobian_precision", ["--batch", "0"], "argument --batch: 0 is not allowed"),
    ("digits_step_time", ["--rounds", "0"], "argument --rounds: 0 is not allowed"),
    ("digits_step_time", ["--steps", "20"], "--steps=20 must exceed the 20 untimed warm-up steps"),
    ("sd_step_memory", ["--variants", "2ndmatch-vjp", "--out", "no/such.json"], "kd is needed"),
    ("latency", ["--round-to", "0"], "argument --round-to: 0 is not allowed"),
    ("train_digits_assets", ["--what", "classifier", "--steps", "100"], "--steps: options of --what teacher"),
    ("train_digits_assets", ["--what", "teacher", "--shift", "3"], "--shift goes with --objective flow"),
    ("train_digits_assets", ["--what", "teacher", "--objective", "flow", "--out", "x", "--shift", "0"],
     "--shift 0.0 is not allowed: it must be > 0"),
    ("data_scale", ["--sizes", "3000,300"], "--sizes 3000,300: give two or more sizes, each larger"),
    ("step_cost", ["--variants", "kd,kd"], "'kd,kd' names kd twice"),
    ("equal_compute_verdict", ["benchmarks/results/flow_matching/digits_flow.json", "--commit", "c"],
     "--min-seeds: give it for 1 input(s)"),
])
def test_each_benchmark_refuses_a_bad_value_at_parsing_naming_it(script, argv, message, capsys):
    """Refused before any work, exit 2 (they used to fail after it, or ignore the value)."""
    import importlib

    module = importlib.import_module(f"benchmarks.{script}")
    with pytest.raises(SystemExit) as refused:
        module.parse_args(argv)
    assert refused.value.code == 2 and message in capsys.readouterr().err


def test_every_committed_benchmark_command_still_parses(monkeypatch, capsys):
    """The commands the result JSONs record (and the docs quote) stay runnable as written; those
    that read a teacher another command writes under runs/, or scikit-image's photos where it is
    not installed, are refused for that reason only."""
    import importlib
    import importlib.util
    import shlex

    root = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(root)
    commands = set()

    def collect(value):
        if isinstance(value, dict):
            for key, item in value.items():
                if key in ("command", "commands") and isinstance(item, (str, list)):
                    commands.update(c for c in ([item] if isinstance(item, str) else item) if isinstance(c, str))
                else:
                    collect(item)
        elif isinstance(value, list):
            for item in value:
                collect(item)

    for folder, pattern in (("benchmarks/results", "**/*.json"), ("benchmarks/teachers", "*.json"),
                            ("nni_2ndmatch/assets", "*.json")):
        for path in (root / folder).glob(pattern):
            collect(json.loads(path.read_text()))
    scripts = [c for c in commands if c.startswith("python benchmarks/")]
    assert len(scripts) > 40
    for command in scripts:
        words = shlex.split(command.split(" (", 1)[0])  # (a note after a command)
        module = importlib.import_module("benchmarks." + Path(words[1]).stem)
        try:
            module.parse_args(words[2:])
        except SystemExit:
            err = capsys.readouterr().err
            written_elsewhere = "'runs/" in err and "is not a diffusers model folder" in err
            no_photos = "scikit-image is not installed" in err and importlib.util.find_spec("skimage") is None
            assert written_elsewhere or no_photos, f"{command}\n{err}"


def test_the_demo_the_examples_and_the_report_follow_the_committed_verdict():
    """The equal-compute rule (docs/results.md): the demo and examples/ use the finetuner its verdict
    recommends (the demo keeps 2ndmatch beside kd as its comparison), and the run report quotes the
    verdict's figures; all agree with the committed verdict.json."""
    import yaml

    from benchmarks.arms import VARIANT
    from nni_2ndmatch.job.report import EQUAL_COMPUTE

    root = Path(__file__).resolve().parent.parent
    verdict = json.loads((root / "benchmarks" / "results" / "equal_compute" / "verdict.json").read_text())
    finetuner, options = arm(verdict["recommended"], VARIANT)
    for path in sorted((root / "examples").glob("*.yaml")):
        section = yaml.safe_load(path.read_text())["finetune"]
        assert section["finetuner"] == finetuner and options.items() <= section.items(), path.name
    if finetuner == "kd":
        compare = yaml.safe_load((root / "examples" / "digits_demo.yaml").read_text())["evaluate"]["compare"]
        assert {"finetuner": "2ndmatch", **VARIANT} in compare

    def gain(d, p):
        return [round(d["mean"], 2), round(d["ci95"][0], 2), round(d["ci95"][1], 2), float(f"{p:.2g}")]

    costs = [t["cost_ratio"]["2ndmatch"] for t in verdict["teachers"].values()]
    steps, compute = verdict["equal_steps"], verdict["equal_compute"]
    assert EQUAL_COMPUTE == {
        "recommended": verdict["recommended"], "teachers": len(verdict["teachers"]),
        "pairs": compute["paired"]["kd_minus_2ndmatch"]["n"],
        "equal_compute": {name: gain(compute["paired"][f"kd_minus_{name}"], d["p_one_sided_holm"])
                          for name, d in verdict["decisions"].items()},
        "equal_steps": gain(steps["paired"]["kd_minus_2ndmatch"], steps["p_one_sided_holm"]["2ndmatch"]),
        "fidelity": {budget: round(verdict[budget]["paired_fidelity"]["kd_minus_2ndmatch"]["mean"], 4)
                     for budget in ("equal_steps", "equal_compute")},
        "cost": [round(min(costs), 2), round(max(costs), 2)]}
