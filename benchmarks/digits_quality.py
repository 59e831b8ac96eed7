"""Quality benchmark on the built-in digits: does 2ndMatch close the gap that pruning opens?

    python benchmarks/digits_quality.py --ratio 0.3 --steps 6000 --batch-size 2 --lr 2e-4 \
        --seeds 0,1,2,3,4,5,6,7,8,9 --lambda-jac 0.1 --jac-reference-dims 3072 --ema-decay 0.9983 \
        --dropout 0.1 --no-wallclock --threads 1    # the committed figures (about 4 hours, 1 idle thread)

The shipped dense teacher is pruned once (torch-pruning magnitude, ``--ratio``); the same pruned
student is finetuned with ``dsm``, ``kd`` and ``2ndmatch`` for the same number of steps and,
separately, the same wall-clock budget (the 2ndmatch run's seconds, converted to steps with each
strategy's measured seconds per step), for each seed. Every model samples from the same noise with
the same deterministic DDIM sampler; we report digits-FID (mean, std over seeds), fidelity to the
teacher's samples and gap_closed = (FID_dsm - FID_2ndmatch) / (FID_dsm - FID_dense).

Results go to --out (+ .md), rewritten after every run; a run already in the JSON with the same
settings is not repeated (so the script resumes after a crash); a JSON of other settings is left
alone unless --overwrite. The committed benchmarks/results/digits_quality.json holds the command
above: the regime of the authors' training script, 10 paired seeds (docs/results.md).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nni_2ndmatch import TrainConfig, finetune, get_finetuner, prune_diffusers  # noqa: E402
from nni_2ndmatch.data import DigitsDataset  # noqa: E402
from nni_2ndmatch.evaluation import ddim_sample, digits_fid, fidelity, sensitivity_profile  # noqa: E402
from nni_2ndmatch.files import write_results  # noqa: E402
from nni_2ndmatch.models import load_diffusers_model  # noqa: E402
from nni_2ndmatch.models.digits import RESOLUTION, load_digits_classifier, load_digits_teacher  # noqa: E402
from nni_2ndmatch.pruning import default_example_inputs  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
STRATEGIES = ("dsm", "kd", "2ndmatch")
PROFILE_TIMESTEPS = [0, 50, 100, 200, 400, 600, 800, 999]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratio", type=float, default=0.5, help="channel share pruned per layer group")
    p.add_argument("--steps", type=int, default=300, help="finetuning steps (equal-steps comparison)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--samples", type=int, default=1000, help="samples per model for digits-FID")
    p.add_argument("--ddim-steps", type=int, default=25)
    p.add_argument("--lambda-jac", type=float, default=0.1)
    p.add_argument("--jac-weighting", default="none", choices=["none", "noise", "x0"])
    p.add_argument("--jac-reference-dims", type=int, help="scale the Jacobian term by d / this (3072: lambda_jac "
                                                         "balanced as in the paper's 32x32x3)")
    p.add_argument("--jac-match", default="norm", choices=["norm", "vector", "log"],
                   help="how the Jacobian products are compared (2ndmatch's jac_match)")
    p.add_argument("--jac-min-timestep", type=int, default=0, help="no Jacobian term below this t")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max global grad norm (the reference: 1.0)")
    p.add_argument("--ema-decay", type=float, help="EMA of the student's weights (the reference: 0.9999 over 100k "
                                                   "steps); default: no EMA")
    p.add_argument("--dropout", type=float, help="the student's residual-block dropout (the reference: 0.1)")
    p.add_argument("--no-wallclock", action="store_true", help="skip the equal wall-clock comparison")
    p.add_argument("--baseline", action="append", default=[],
                   help="a results JSON whose runs of the same seed and steps are reused: dsm and kd, and 2ndmatch "
                        "too where its Jacobian options match (the other settings must match, except --seeds and "
                        "--no-wallclock); may be given several times")
    p.add_argument("--teacher", help="a diffusers folder to use as the dense teacher instead of the shipped one "
                                     "(e.g. one trained with train_digits_assets.py --dequantize)")
    p.add_argument("--dequantize", action="store_true", help="finetune on dequantised digits (uniform noise "
                                                             "within each grey level)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (part of the settings: results differ "
                                                          "in the last bits between thread counts)")
    p.add_argument("--out", default=str(RESULTS / "digits_quality.json"))
    p.add_argument("--overwrite", action="store_true", help="start --out again when it holds runs of other settings")
    p.add_argument("--finetuners", default=",".join(STRATEGIES),
                   help="which of dsm, kd, 2ndmatch to run (2ndmatch always; e.g. kd,2ndmatch skips dsm)")
    return p.parse_args()


def evaluate(model, noise, teacher_samples, classifier, ddim_steps) -> dict[str, float]:
    samples = ddim_sample(model.eval(), noise, ddim_steps)
    return {"fid": digits_fid(samples, classifier), "fidelity": fidelity(samples, teacher_samples)}


def summarize(runs: list[dict], key: str) -> dict[str, float]:
    values = [r[key] for r in runs]
    return {f"{key}_mean": statistics.fmean(values), f"{key}_std": statistics.stdev(values) if len(values) > 1 else 0.0}


def paired(runs: list[dict], base: str) -> dict[str, float]:
    """digits-FID of ``base`` minus 2ndmatch's, seed by seed (positive: 2ndmatch better); paired t test,
    one-sided p for "2ndmatch is better"."""
    from scipy import stats

    by_seed = {(r["strategy"], r["seed"]): r["fid"] for r in runs}
    diffs = [by_seed[(base, s)] - by_seed[("2ndmatch", s)] for (name, s) in by_seed if name == base
             and ("2ndmatch", s) in by_seed]
    n = len(diffs)
    mean = statistics.fmean(diffs) if diffs else math.nan
    std = statistics.stdev(diffs) if n > 1 else math.nan
    t = mean / (std / math.sqrt(n)) if n > 1 and std > 0 else math.nan
    p = float(stats.t.sf(t, n - 1)) if math.isfinite(t) else math.nan
    return {"mean": mean, "std": std, "n": n, "t": t, "p_one_sided": p, "wins": sum(d > 0 for d in diffs)}


def write(results: dict, out: Path) -> None:
    lines = ["# digits quality benchmark", "", f"Command: `{results['command']}`", "",
             f"Dense teacher digits-FID: {results['dense']['fid_mean']:.3f}; pruned before finetuning: "
             f"{results['pruned']['fid']:.3f} (MACs ratio {results['pruned']['macs_ratio']:.3f})", ""]
    for budget in ("equal_steps", "equal_wallclock"):
        table = results.get(budget, {}).get("strategies", {})
        if not table:
            continue
        lines += [f"## {budget.replace('_', ' ')}", "", "| strategy | steps | seconds | digits-FID | fidelity (RMS) |",
                  "|---|---|---|---|---|"]
        for name in (n for n in STRATEGIES if n in table):
            row = table[name]
            lines.append(f"| {name} | {row['steps']} | {row['seconds']:.0f} | "
                         f"{row['fid_mean']:.3f} ± {row['fid_std']:.3f} | "
                         f"{row['fidelity_mean']:.4f} ± {row['fidelity_std']:.4f} |")
        if "gap_closed" in results[budget]:
            lines += ["", f"gap closed: {results[budget]['gap_closed']:.3f}"]
        for key, d in results[budget].get("paired", {}).items():
            lines.append(f"{key} (digits-FID, positive: 2ndmatch better): {d['mean']:.3f} ± {d['std']:.3f} over "
                         f"{d['n']} seeds, 2ndmatch better on {d['wins']}, t {d['t']:.2f}, one-sided p "
                         f"{d['p_one_sided']:.3g}")
        lines.append("")
    write_results(out, results, "\n".join(lines))


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    seeds = [int(s) for s in args.seeds.split(",")]
    # everything that changes the floats: the options, the thread count, the torch build and the CPU
    absent_at_default = {"teacher": None, "dequantize": False, "jac_match": "norm", "jac_min_timestep": 0}
    names = [n for n in STRATEGIES if n in args.finetuners.split(",")]
    if "2ndmatch" not in names or set(args.finetuners.split(",")) - set(STRATEGIES):
        sys.exit(f"--finetuners {args.finetuners!r}: give some of {', '.join(STRATEGIES)}, 2ndmatch among them")
    settings = {**{k: v for k, v in vars(args).items() if k not in ("out", "baseline", "overwrite", "finetuners")
                   and not (k in absent_at_default and v == absent_at_default[k])},  # (older JSONs lack them)
                "torch": torch.__version__, "machine": platform.machine()}
    if args.teacher:  # runs of another teacher at the same path are not reused
        weights = Path(args.teacher) / "diffusion_pytorch_model.safetensors"
        if not weights.is_file():
            sys.exit(f"--teacher {args.teacher}: no {weights.name} there (a diffusers model folder is needed)")
        settings["teacher_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    reusable, base_profile = [], None  # runs of --baseline, and its 2ndmatch sensitivity profile
    jac_options = ("lambda_jac", "jac_weighting", "jac_reference_dims", "jac_match", "jac_min_timestep")
    free = (*jac_options, "seeds", "no_wallclock")  # runs are matched by seed and steps
    for baseline in args.baseline:
        base = json.loads(Path(baseline).read_text())
        if {k: v for k, v in base["settings"].items() if k not in free} != \
                {k: v for k, v in settings.items() if k not in free}:
            sys.exit(f"--baseline {baseline}: its settings differ beyond {', '.join(free)}")
        same_jac = all(base["settings"].get(k) == settings.get(k) for k in jac_options)
        reusable += [r for budget in ("equal_steps", "equal_wallclock") for r in base.get(budget, {}).get("runs", [])
                     if r["strategy"] != "2ndmatch" or same_jac]
        if same_jac and int(base["settings"]["seeds"].split(",")[0]) == seeds[0]:
            base_profile = base_profile or base.get("sensitivity_profile", {}).get("2ndmatch")
    results = json.loads(out.read_text()) if out.exists() else {}
    if results and results.get("settings") != settings:
        if not args.overwrite:
            stored = results.get("settings", {})
            changed = sorted(k for k in {*settings, *stored} if settings.get(k) != stored.get(k))
            sys.exit(f"--out {out} holds runs with other settings (differing: {', '.join(changed)}); give another "
                     f"--out, the same settings to resume, or --overwrite to start it again")
        results = {}
    results["settings"] = settings
    results["command"] = "python benchmarks/digits_quality.py " + " ".join(sys.argv[1:])

    teacher = load_diffusers_model(args.teacher).eval() if args.teacher else load_digits_teacher()
    classifier = load_digits_classifier()
    dataset = DigitsDataset(RESOLUTION, "train", dequantize=args.dequantize)
    noise = torch.randn(args.samples, 1, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(1234))
    teacher_samples = ddim_sample(teacher, noise, args.ddim_steps)
    results["dense"] = {"fid_mean": digits_fid(teacher_samples, classifier)}
    inputs = default_example_inputs(teacher)
    student0, report = prune_diffusers(teacher, "magnitude", args.ratio, example_inputs=inputs, round_to=None)
    results["pruned"] = {**evaluate(copy.deepcopy(student0), noise, teacher_samples, classifier, args.ddim_steps),
                         "macs_ratio": report["macs_ratio"], "params_ratio": report["params_ratio"]}
    x0 = dataset.images[:64]
    results["sensitivity_profile"] = {**results.get("sensitivity_profile", {}), "timesteps": PROFILE_TIMESTEPS,
                                      "teacher": sensitivity_profile(teacher, x0, PROFILE_TIMESTEPS),
                                      "pruned": sensitivity_profile(student0, x0, PROFILE_TIMESTEPS)}
    if base_profile:  # the baseline's first 2ndmatch run is this one's (same settings and seed)
        results["sensitivity_profile"].setdefault("2ndmatch", base_profile)
    write(results, out)

    def run(budget: str, name: str, seed: int, steps: int) -> dict:
        done = results.setdefault(budget, {}).setdefault("runs", [])
        for r in done:
            if (r["strategy"], r["seed"], r["steps"]) == (name, seed, steps):
                return r
        for r in results.get("equal_steps", {}).get("runs", []) + reusable:  # the same run (deterministic)
            if (r["strategy"], r["seed"], r["steps"]) == (name, seed, steps):
                done.append(r)
                summarize_budget(budget)
                write(results, out)
                return r
        options = {"lambda_jac": args.lambda_jac, "jac_weighting": args.jac_weighting,
                   "jac_reference_dims": args.jac_reference_dims, "jac_match": args.jac_match,
                   "jac_min_timestep": args.jac_min_timestep} if name == "2ndmatch" else {}
        config = TrainConfig(steps=steps, batch_size=args.batch_size, lr=args.lr, seed=seed, ema_decay=args.ema_decay,
                             grad_clip=args.grad_clip, dropout=args.dropout, checkpoint_every=10**9,
                             log_every=max(1, steps // 10))
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            trained = finetune(copy.deepcopy(student0), teacher, get_finetuner(name, **options), dataset, config, tmp,
                               progress=True).student
        seconds = time.perf_counter() - start
        row = {"strategy": name, "seed": seed, "steps": steps, "seconds": seconds,
               **evaluate(trained, noise, teacher_samples, classifier, args.ddim_steps)}
        if name == "2ndmatch" and seed == seeds[0] and budget == "equal_steps":
            results["sensitivity_profile"]["2ndmatch"] = sensitivity_profile(trained, x0, PROFILE_TIMESTEPS)
        done.append(row)
        summarize_budget(budget)
        write(results, out)
        return row

    def summarize_budget(budget: str) -> None:
        section = results[budget]
        table = {}
        for name in STRATEGIES:
            rows = sorted((r for r in section["runs"] if r["strategy"] == name), key=lambda r: r["seed"])
            if rows:
                table[name] = {"steps": rows[0]["steps"], "seconds": statistics.fmean(r["seconds"] for r in rows),
                               **summarize(rows, "fid"), **summarize(rows, "fidelity"), "seeds": len(rows)}
        section["strategies"] = table
        if "dsm" in table and "2ndmatch" in table:
            gap = table["dsm"]["fid_mean"] - results["dense"]["fid_mean"]
            section["gap_closed"] = (table["dsm"]["fid_mean"] - table["2ndmatch"]["fid_mean"]) / gap
            spread = max(table["dsm"]["fid_std"], table["2ndmatch"]["fid_std"])
            section["difference_over_2std"] = (table["dsm"]["fid_mean"] - table["2ndmatch"]["fid_mean"]) > 2 * spread
        section["paired"] = {f"{base}_minus_2ndmatch": paired(section["runs"], base) for base in ("kd", "dsm")
                             if base in table and "2ndmatch" in table}

    for seed in seeds:
        for name in names:
            run("equal_steps", name, seed, args.steps)
    if not args.no_wallclock:
        per_step = {n: results["equal_steps"]["strategies"][n]["seconds"] / args.steps for n in names}
        budget_s = per_step["2ndmatch"] * args.steps
        results.setdefault("equal_wallclock", {})["budget_seconds"] = budget_s
        for seed in seeds:
            for name in names:
                run("equal_wallclock", name, seed, max(1, round(budget_s / per_step[name])))
    # top level: the equal-steps comparison (per strategy fid_mean, fid_std, fidelity_mean, steps, seconds)
    results.update(results["equal_steps"]["strategies"])
    results["gap_closed"] = results["equal_steps"].get("gap_closed")
    results["paired"] = results["equal_steps"].get("paired", {})
    write(results, out)
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
