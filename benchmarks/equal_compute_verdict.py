"""The equal-compute experiment's verdict, by the rule committed in docs/results.md before the runs.

    python benchmarks/equal_compute_verdict.py --commit PINNED \
        benchmarks/results/equal_compute/digits.json benchmarks/results/equal_compute/digits_dequantized.json \
        benchmarks/results/equal_compute/mnist.json

Each input is one teacher's ``digits_quality.py --budget equal-compute`` JSON. For every setting run
at equal compute beside kd, the seed-paired differences kd minus setting (digits-FID and fidelity;
positive: the setting is better) are pooled over the teachers with the teacher as a stratum
(paired_stats.stratified), and the one-sided p-values of the settings are Holm-adjusted. The rule:
a setting is recommended over kd only if its pooled gain in digits-FID is significant (adjusted
one-sided p < 0.05), at least ``--min-gain`` (1.0) and positive on every teacher; it is "not worse"
than kd if the pooled 95% interval lies above ``-margin`` (1.0). At equal steps, kd minus each arm
of ``--equal-steps-arms`` (the variant; the paper's form too in the flow-matching runs) is reported
the same way, Holm-adjusted within the budget (``significant``: adjusted one-sided p < 0.05), which
decides nothing in the equal-compute experiment and is the flow-matching rule's "helps on a velocity
field"; with one teacher the verdict's "recommended" reads "better than kd on this teacher", which
changes nothing the package recommends. Runs of another commit than
``--commit``, or missing runs, are an error: the verdict is of pinned code. ``--commit
TEACHER=SHA`` pins one teacher's runs (the input named TEACHER.json) to another commit (MNIST's
runs: docs/results.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.paired_stats import holm, seed_differences, stratified  # noqa: E402
from benchmarks.record import record  # noqa: E402
from nni_2ndmatch.files import write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "equal_compute"
ALPHA = 0.05
# the settings the rule fixes for every teacher (the data, teacher, seeds, costs and sampling batch are each
# teacher's own)
REGIME = ("batch_size", "compute_arms", "ddim_steps", "dropout", "ema_decay", "grad_clip", "jac_match",
          "jac_reference_dims", "jac_weighting", "lambda_jac", "lr", "ratio", "samples", "steps", "threads")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="one digits_quality.py JSON per teacher")
    p.add_argument("--commit", action="append", required=True,
                   help="the pinned commit every run must come from; TEACHER=SHA: that teacher's (repeatable)")
    p.add_argument("--min-gain", type=float, default=1.0, help="digits-FID a recommended setting gains at least")
    p.add_argument("--margin", type=float, default=1.0, help="digits-FID of the 'not worse' margin")
    p.add_argument("--min-seeds", help="at least this many seeds per input: one count for all, or one per input "
                   "in order (default: the rule's 12,12,8 for its three teachers; give it for another number)")
    p.add_argument("--equal-steps-arms", default="2ndmatch", help="the arms run beside kd at equal steps, each "
                   "required in every input (the flow-matching runs: 2ndmatch,2ndmatch-paper)")
    p.add_argument("--out", default=str(RESULTS / "verdict.json"))
    args = p.parse_args(argv)
    if args.min_seeds is None and len(args.results) != 3:
        p.error(f"--min-seeds: give it for {len(args.results)} input(s) (the default 12,12,8 is the rule's for the "
                "digits, dequantised and MNIST teachers)")
    try:
        args.min_seeds = [int(x) for x in (args.min_seeds or "12,12,8").split(",")]
    except ValueError:
        p.error(f"--min-seeds {args.min_seeds!r}: give integers, comma-separated")
    if min(args.min_seeds) < 2:
        p.error(f"--min-seeds {','.join(map(str, args.min_seeds))}: each value must be at least 2 (a teacher's "
                "variance needs two pairs)")
    if len(args.min_seeds) not in (1, len(args.results)):
        p.error(f"--min-seeds {','.join(map(str, args.min_seeds))}: give one count, or one per input "
                f"({len(args.results)})")
    missing = [path for path in args.results if not Path(path).is_file()]
    if missing:
        p.error(f"{missing[0]}: no such file")
    return args


def load(path: str, commit: str, min_seeds: int, equal_steps: list[str]) -> tuple[str, dict]:
    results = json.loads(Path(path).read_text())
    kind = (results["settings"].get("budget") or {}).get("kind")
    if kind != "equal-compute":
        sys.exit(f"{path}: settings.budget is {kind or 'missing'}, not equal-compute: give the JSONs of "
                 "digits_quality.py --budget equal-compute")
    seeds = [int(s) for s in results["settings"]["seeds"].split(",")]
    if len(seeds) < min_seeds:
        sys.exit(f"{path}: {len(seeds)} seeds; the rule asks for at least {min_seeds}")
    for budget in ("equal_steps", "equal_compute"):
        runs = results.get(budget, {}).get("runs", [])
        wrong = sorted({r.get("commit") for r in runs} - {commit})
        if wrong:
            sys.exit(f"{path}: {budget} has runs of commit(s) {', '.join(map(str, wrong))}, not {commit}")
        have = [(r["strategy"], r["seed"]) for r in runs]
        foreign = sorted({seed for _, seed in have} - set(seeds))
        if foreign:
            sys.exit(f"{path}: {budget} has runs of seed(s) {', '.join(map(str, foreign))}, not among its settings' "
                     f"seeds")
        if len(set(have)) < len(have):
            sys.exit(f"{path}: {budget} holds a run twice, e.g. {next(k for k in have if have.count(k) > 1)}")
        steps = results["settings"]["budget"]["steps"] if budget == "equal_compute" else {}
        odd = [r for r in runs if r["steps"] != steps.get(r["strategy"], results["settings"]["steps"])]
        if odd:
            sys.exit(f"{path}: {budget} run {odd[0]['strategy']} seed {odd[0]['seed']} has {odd[0]['steps']} steps, "
                     "not its budget's")
        arms = {*steps, "kd"} if budget == "equal_compute" else {"kd", *equal_steps}
        want = {(a, s) for a in arms for s in seeds}
        if want - set(have):
            sys.exit(f"{path}: {budget} lacks {len(want - set(have))} run(s), e.g. {sorted(want - set(have))[0]}")
    return Path(path).stem, results


def pinned_commits(given: list[str], paths: list[str]) -> dict[str, str]:
    """Each input's pinned commit from ``--commit`` SHA (every input) and TEACHER=SHA (one)."""
    default = [c for c in given if "=" not in c]
    named = dict(c.split("=", 1) for c in given if "=" in c)
    stems = [Path(p).stem for p in paths]
    if len(set(stems)) < len(stems):
        sys.exit(f"inputs {', '.join(paths)}: two have the same file name; each is one teacher, named by it")
    if len(default) > 1 or set(named) - set(stems):
        sys.exit(f"--commit {' '.join(given)}: give one SHA for every input and TEACHER=SHA for any other, "
                 f"TEACHER among {', '.join(stems)}")
    if not default and set(stems) - set(named):
        sys.exit(f"--commit: no commit for {', '.join(sorted(set(stems) - set(named)))}")
    return {stem: named.get(stem, default[0] if default else "") for stem in stems}


def main(args: argparse.Namespace) -> dict:
    minimum = args.min_seeds
    equal_steps = [a.strip() for a in args.equal_steps_arms.split(",") if a.strip()]
    commits = pinned_commits(args.commit, args.results)
    teachers = dict(load(path, commits[Path(path).stem], minimum[min(i, len(minimum) - 1)], equal_steps)
                    for i, path in enumerate(args.results))
    for key in REGIME:
        values = {name: r["settings"].get(key) for name, r in teachers.items()}
        if len({json.dumps(v) for v in values.values()}) > 1:
            sys.exit(f"the teachers ran different settings.{key}: " + ", ".join(f"{n} {v!r}" for n, v in values.items())
                     + "; the rule fixes it for all")
    arms = {name: set(r["settings"]["budget"]["steps"]) for name, r in teachers.items()}
    if len({frozenset(a) for a in arms.values()}) > 1:
        sys.exit("the teachers ran different arms at equal compute: " + "; ".join(
            f"{name}: {', '.join(sorted(a))}" for name, a in arms.items()))
    settings = sorted(next(iter(arms.values())) - {"kd"})
    common = {"equal_steps": equal_steps, "equal_compute": settings}
    verdict: dict = {**record(__file__),
                     "commits": commits, "rule": {"alpha": ALPHA, "min_gain": args.min_gain, "margin": args.margin,
                                                     "correction": f"Holm over {len(settings)} settings"},
                     "teachers": {name: {"teacher_sha256": r["teacher_sha256"],
                                         "cost_ratio": r["settings"]["cost_ratio"],
                                         "steps": r["settings"]["budget"]["steps"]} for name, r in teachers.items()}}
    for budget, pairs in common.items():
        section = verdict.setdefault(budget, {})
        for key, field in (("paired", "fid"), ("paired_fidelity", "fidelity")):
            section[key] = {f"kd_minus_{name}": stratified({t: seed_differences(r[budget]["runs"], "kd", name, field)
                                                            for t, r in teachers.items()}) for name in pairs}
        # reported, deciding nothing at equal steps: the one-sided p-values Holm-adjusted within the budget
        section["p_one_sided_holm"] = holm({name: section["paired"][f"kd_minus_{name}"]["p_one_sided"]
                                            for name in pairs})
        section["significant"] = [name for name, p in section["p_one_sided_holm"].items() if p < ALPHA]
    pooled = verdict["equal_compute"]["paired"]
    adjusted = holm({name: pooled[f"kd_minus_{name}"]["p_one_sided"] for name in settings})
    decisions = {}
    for name in settings:
        d = pooled[f"kd_minus_{name}"]
        every_teacher = all(s["mean"] > 0 for s in d["strata"].values())
        decisions[name] = {"p_one_sided_holm": adjusted[name], "gain": d["mean"], "ci95": d["ci95"],
                           "positive_on_every_teacher": every_teacher,
                           "recommended_over_kd": (adjusted[name] < ALPHA and d["mean"] >= args.min_gain
                                                   and every_teacher),
                           "not_worse_than_kd": d["ci95"][0] > -args.margin}
    verdict["decisions"] = decisions
    recommended = [n for n, d in decisions.items() if d["recommended_over_kd"]]
    verdict["recommended"] = max(recommended, key=lambda n: decisions[n]["gain"]) if recommended else "kd"
    write_results(Path(args.out), verdict, render(verdict))
    print(render(verdict))
    return verdict


def render(verdict: dict) -> str:
    lines = ["# Equal compute: the verdict", "", f"Command: `{verdict['command']}`", "",
             f"Rule: {verdict['rule']['correction']}; recommended over kd if the adjusted one-sided p < "
             f"{verdict['rule']['alpha']}, the pooled gain >= {verdict['rule']['min_gain']} digits-FID and positive on "
             f"every teacher; not worse if the pooled 95% interval is above -{verdict['rule']['margin']}.", "",
             "| budget | kd minus | teacher | n | digits-FID gain | 95% CI | p one-sided | fidelity gain |",
             "|---|---|---|---|---|---|---|---|"]
    for budget in ("equal_steps", "equal_compute"):
        for pair, d in verdict[budget]["paired"].items():
            fidelity = verdict[budget]["paired_fidelity"][pair]
            holm_p = verdict[budget]["p_one_sided_holm"][pair.removeprefix("kd_minus_")]
            rows = [("pooled", d, fidelity)] + [(t, s, fidelity["strata"][t]) for t, s in d["strata"].items()]
            lines += [f"| {budget.replace('_', ' ')} | {pair.removeprefix('kd_minus_')} | {t} | {s['n']} | "
                      f"{s['mean']:+.2f} | [{s['ci95'][0]:+.2f}, {s['ci95'][1]:+.2f}] | {s['p_one_sided']:.3g}"
                      f"{f' (Holm {holm_p:.3g})' if t == 'pooled' else ''} | {f['mean']:+.4f} |" for t, s, f in rows]
    lines += ["", "| setting | Holm p | gain | positive on every teacher | recommended over kd | not worse |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {n} | {d['p_one_sided_holm']:.3g} | {d['gain']:+.2f} | {d['positive_on_every_teacher']} | "
              f"{d['recommended_over_kd']} | {d['not_worse_than_kd']} |" for n, d in verdict["decisions"].items()]
    steps = verdict["equal_steps"]["significant"]
    lines += ["", "At equal steps, better than kd (Holm-adjusted one-sided p < "
              f"{verdict['rule']['alpha']}): {', '.join(steps) or 'none'}", ""]
    if len(verdict["teachers"]) == 1:
        better = verdict["recommended"]
        lines.append(f"Better than kd at equal compute on this one teacher: **{'none' if better == 'kd' else better}** "
                     "(one teacher changes nothing the package recommends)")
    else:
        lines.append(f"Recommended: **{verdict['recommended']}**")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main(parse_args())
