"""Quality benchmark on real digits: does 2ndMatch close the gap that pruning opens, and is it
worth its price?

    python benchmarks/digits_quality.py --ratio 0.3 --steps 6000 --batch-size 2 --lr 2e-4 \
        --seeds 0,1,2,3,4,5,6,7,8,9 --lambda-jac 0.1 --jac-reference-dims 3072 --ema-decay 0.9983 \
        --dropout 0.1 --no-wallclock --threads 1    # the committed figures (about 4 hours, 1 idle thread)

The dense teacher (``--data digits``: the shipped one for scikit-learn's 8x8 digits, or ``--data
mnist``: the shipped MNIST one; ``--teacher`` another diffusers folder trained on that data, a
flow-matching one when it holds a ``scheduler_config.json``: every arm then trains on its objective) is
pruned once (torch-pruning magnitude, ``--ratio``); the same pruned student is finetuned by each
arm of ``--finetuners`` (benchmarks/arms.py: dsm, kd, kd-perturb, 2ndmatch, 2ndmatch-every<K>,
2ndmatch-paper)
for the same number of steps, for each seed. Then one more budget (``--budget``):

- ``equal-wallclock`` (the default unless ``--no-wallclock``): each arm gets the 2ndmatch run's
  seconds, converted to steps with its own measured seconds per step (beside other jobs, noisy);
- ``equal-compute``: each arm of ``--compute-arms`` gets the steps that the most expensive of them
  buys in ``--steps`` steps, at the whole-run cost ratios of ``--cost`` (benchmarks/run_cost.py,
  measured idle before the runs); the ratios and steps are stored as ``settings.cost_ratio`` and
  ``settings.budget``, never taken from the runs' own clocks.

Every model samples from the same noise with the same deterministic sampler (DDIM; Euler on the
velocity for a flow-matching teacher); we report
digits-FID (mean, std over seeds), fidelity to the teacher's samples (RMS, lower is closer),
gap_closed = (FID_dsm - FID_2ndmatch) / (FID_dsm - FID_dense) and, per budget, paired statistics of
kd minus each other arm (``paired`` for digits-FID, ``paired_fidelity``; benchmarks/paired_stats.py).

Results go to --out (+ .md), rewritten after every run; a run already in the JSON with the same
settings is not repeated (so the script resumes after a crash); a JSON of other settings is left
alone unless --overwrite. So that a restart loses little, ``<out>.cache/`` keeps (as safetensors,
with the settings that made them) the teacher's samples and each trained model until its run is
recorded, and the evaluation-noise draws are recorded one by one. Each run records the git commit
that made it; the JSON the CPU and the teacher's sha256.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from pydantic import ValidationError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import options  # noqa: E402
from benchmarks.arms import ARM_HELP, arm, load_teacher, parse_arms  # noqa: E402
from benchmarks.paired_stats import paired, seed_differences  # noqa: E402
from benchmarks.record import record  # noqa: E402
from nni_2ndmatch import TrainConfig, finetune, get_finetuner, prune_diffusers  # noqa: E402
from nni_2ndmatch.evaluation import fidelity, frechet_distance, sample, sensitivity_profile  # noqa: E402
from nni_2ndmatch.files import save_tensors, write_results  # noqa: E402
from nni_2ndmatch.finetuners import jac_every_refusal  # noqa: E402
from nni_2ndmatch.pruning import default_example_inputs  # noqa: E402
from nni_2ndmatch.training import Watch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PROFILE_TIMESTEPS = [0, 50, 100, 200, 400, 600, 800, 999]
SAMPLE_NOISE_SEED = 1234
#: options absent from the settings at their default (JSONs written before they existed lack them)
ABSENT_AT_DEFAULT = {"teacher": None, "dequantize": False, "jac_match": "norm", "jac_min_timestep": 0,
                     "data": "digits", "budget": "equal-wallclock", "compute_arms": None, "sample_batch": 256}
NOT_SETTINGS = ("out", "baseline", "overwrite", "finetuners", "cost", "eval_noise_draws")
BUDGET_KEYS = {"equal-wallclock": "equal_wallclock", "equal-compute": "equal_compute"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="digits", choices=["digits", "mnist"], help="the teacher's data set")
    p.add_argument("--ratio", type=options.fraction, default=0.5, help="channel share pruned per layer group")
    p.add_argument("--steps", type=options.count(1), default=300, help="finetuning steps (equal-steps comparison)")
    p.add_argument("--batch-size", type=options.count(1), default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--samples", type=options.count(2), default=1000, help="samples per model for digits-FID")
    p.add_argument("--ddim-steps", type=options.count(1), default=25, help="sampling steps: DDIM's, or Euler's for a "
                                                              "flow-matching teacher (the same noise for every model)")
    p.add_argument("--sample-batch", type=options.count(1), default=256,
                   help="samples drawn at a time (28x28 on one thread: 64 is about 1.4x faster than 256, with the "
                        "same floats)")
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
    p.add_argument("--budget", default="equal-wallclock", choices=list(BUDGET_KEYS),
                   help="the second budget beside equal steps (see the docstring)")
    p.add_argument("--no-wallclock", action="store_true", help="skip the equal wall-clock comparison")
    p.add_argument("--compute-arms", help=f"equal-compute: the arms given the same compute ({ARM_HELP}; default: "
                                          "--finetuners)")
    p.add_argument("--cost", help="equal-compute: run_cost.py's JSON (default: benchmarks/results/run_cost.json)")
    p.add_argument("--eval-noise-draws", type=options.count(0), default=0,
                   help="also measure digits-FID's own noise: the first seed's equal-steps models scored on this many "
                        "other sample-noise draws (0: none; else at least 2)")
    p.add_argument("--baseline", action="append", default=[],
                   help="a results JSON whose runs of the same seed and steps are reused: dsm and kd, and 2ndmatch "
                        "too where its Jacobian options match (the other settings must match, except --seeds and "
                        "--no-wallclock); may be given several times")
    p.add_argument("--teacher", type=options.model_folder,
                   help="a diffusers folder to use as the dense teacher instead of the shipped one (e.g. one trained "
                        "with train_digits_assets.py --dequantize)")
    p.add_argument("--dequantize", action="store_true", help="finetune on dequantised digits (uniform noise "
                                                             "within each grey level)")
    p.add_argument("--threads", type=options.count(1), default=2,
                   help="torch threads (part of the settings: results differ in the last bits between thread counts)")
    p.add_argument("--out", default=str(RESULTS / "digits_quality.json"))
    p.add_argument("--overwrite", action="store_true", help="start --out again when it holds runs of other settings")
    p.add_argument("--finetuners", default="dsm,kd,2ndmatch", help=f"the arms at equal steps ({ARM_HELP}); kd "
                   "among them (the baseline of the paired statistics)")
    args = p.parse_args(argv)
    try:
        args.arms = parse_arms(args.finetuners)
        args.compute = parse_arms(args.compute_arms) if args.compute_arms else list(args.arms)
    except ValueError as e:
        p.error(str(e))
    if "kd" not in args.arms:
        p.error(f"--finetuners {args.finetuners!r}: kd is the baseline of the paired statistics; list it")
    if args.budget == "equal-wallclock" and not args.no_wallclock and "2ndmatch" not in args.arms:
        p.error("--budget equal-wallclock takes the 2ndmatch run's seconds: list 2ndmatch or give --no-wallclock")
    if args.compute_arms and args.budget != "equal-compute":
        p.error("--compute-arms goes with --budget equal-compute")
    if args.cost is not None and args.budget != "equal-compute":
        p.error("--cost goes with --budget equal-compute")
    args.cost = args.cost or str(RESULTS / "run_cost.json")
    if args.no_wallclock and args.budget != "equal-wallclock":
        p.error("--no-wallclock goes with --budget equal-wallclock")
    if args.budget == "equal-compute" and not Path(args.cost).is_file():
        p.error(f"--cost {args.cost}: no such file; measure the costs first (benchmarks/run_cost.py)")
    missing = [b for b in args.baseline if not Path(b).is_file()]
    if missing:
        p.error(f"--baseline {missing[0]}: no such file")
    if args.eval_noise_draws == 1:
        p.error("--eval-noise-draws 1: a spread needs at least 2 draws (0: none)")
    seeds = args.seeds.split(",")
    if not all(seed.isdigit() for seed in seeds) or len(set(map(int, seeds))) < len(seeds):
        p.error(f"--seeds {args.seeds!r}: give distinct non-negative integers, comma-separated")
    # the loop's settings and every arm's finetuner, checked before any teacher is sampled or arm trained
    try:
        TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=0, ema_decay=args.ema_decay,
                    grad_clip=args.grad_clip, dropout=args.dropout)
    except ValidationError as e:
        p.error("; ".join(f"--{str(err['loc'][-1]).replace('_', '-')} {err.get('input')!r} is not allowed: "
                          f"{err['msg']}" for err in e.errors()))
    for name in dict.fromkeys([*args.arms, *args.compute]):
        finetuner, arm_options = arm(name, jac_options(args))
        try:
            get_finetuner(finetuner, **arm_options)
        except ValueError as e:  # (the strategies name the option and the value)
            p.error(f"{name}: {e}")
        refusal = jac_every_refusal(arm_options.get("jac_every", 1), args.steps)
        if refusal:
            p.error(f"{name}: {refusal}")
    return args


def jac_options(args: argparse.Namespace) -> dict:
    return {"lambda_jac": args.lambda_jac, "jac_weighting": args.jac_weighting,
            "jac_reference_dims": args.jac_reference_dims, "jac_match": args.jac_match,
            "jac_min_timestep": args.jac_min_timestep}


def equal_compute_budget(args: argparse.Namespace) -> tuple[dict, dict]:
    """(budget, cost_ratio) of ``--budget equal-compute``: each compute arm's steps from the idle
    whole-run cost ratios of ``--cost`` for this data set."""
    cost = json.loads(Path(args.cost).read_text())
    table = cost.get("data", {}).get(args.data, {}).get("arms", {})
    missing = [name for name in args.compute if name not in table]
    if missing:
        sys.exit(f"--cost {args.cost}: no {args.data} cost for {', '.join(missing)}; run benchmarks/run_cost.py "
                 "with those arms")
    # a cost measured for other Jacobian options or another thread count is not this run's
    differ = [f"threads {cost['threads']} (this run: {args.threads})"] if cost.get("threads", args.threads) != \
        args.threads else []
    if any(name == "2ndmatch" or name.startswith("2ndmatch-every") for name in args.compute):
        measured = {"jac_min_timestep": 0, **cost.get("variant", {})} if "variant" in cost else {}
        differ += [f"{key} {measured[key]!r} (this run: {value!r})" for key, value in jac_options(args).items()
                   if key in measured and measured[key] != value]
    if differ:
        sys.exit(f"--cost {args.cost}: measured with {', '.join(differ)}; give a cost file measured with this "
                 "run's options (benchmarks/run_cost.py)")
    ratio = {name: table[name]["vs_kd"] for name in args.compute}
    reference = max(ratio, key=ratio.get)
    steps = {name: max(1, round(args.steps * ratio[reference] / ratio[name])) for name in args.compute}
    return ({"kind": "equal-compute", "reference_arm": reference, "reference_steps": args.steps, "steps": steps,
             "cost_file": Path(args.cost).name, "cost_commit": cost.get("commit")}, ratio)


def settings_of(args: argparse.Namespace, teacher_sha256: str) -> dict:
    """Everything that changes the floats: the options, the thread count, the torch build and the CPU."""
    settings = {**{k: v for k, v in vars(args).items() if k not in (*NOT_SETTINGS, "arms", "compute")
                   and not (k in ABSENT_AT_DEFAULT and v == ABSENT_AT_DEFAULT[k])},
                "torch": torch.__version__, "machine": platform.machine()}
    if args.teacher:  # runs of another teacher at the same path are not reused
        settings["teacher_sha256"] = teacher_sha256
    if args.budget == "equal-compute":
        settings["budget"], settings["cost_ratio"] = equal_compute_budget(args)
        settings.pop("no_wallclock", None)
    return settings


class Cache:
    """Work a restart need not redo, in ``<out>.cache/``: tensors saved with the settings that made
    them, and loaded only by a run of the same settings."""

    def __init__(self, out: Path, settings: dict) -> None:
        self.folder, self.key = out.with_suffix(".cache"), json.dumps(settings, sort_keys=True)

    def load(self, name: str) -> tuple[dict, dict] | None:
        """(tensors, metadata) of ``name``, or None when it is missing, unreadable or of other settings."""
        from safetensors import SafetensorError, safe_open

        path = self.folder / f"{name}.safetensors"
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                return ({k: f.get_tensor(k) for k in f.keys()}, meta) if meta.get("settings") == self.key else None
        except (OSError, SafetensorError):
            return None

    def save(self, name: str, tensors: dict, **metadata: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        save_tensors(self.folder / f"{name}.safetensors", tensors, {"settings": self.key, **metadata})

    def drop(self, name: str) -> None:
        (self.folder / f"{name}.safetensors").unlink(missing_ok=True)


def reusable_runs(args: argparse.Namespace, settings: dict) -> tuple[list[dict], dict | None]:
    """Runs of the ``--baseline`` JSONs that this one may reuse, and their 2ndmatch sensitivity profile."""
    reusable, profile = [], None
    jac_keys = ("lambda_jac", "jac_weighting", "jac_reference_dims", "jac_match", "jac_min_timestep")
    free = (*jac_keys, "seeds", "no_wallclock")  # runs are matched by seed and steps
    for baseline in args.baseline:
        base = json.loads(Path(baseline).read_text())
        if {k: v for k, v in base["settings"].items() if k not in free} != \
                {k: v for k, v in settings.items() if k not in free}:
            sys.exit(f"--baseline {baseline}: its settings differ beyond {', '.join(free)}")
        same_jac = all(base["settings"].get(k) == settings.get(k) for k in jac_keys)
        reusable += [r for budget in BUDGET_KEYS.values() for r in base.get(budget, {}).get("runs", [])
                     if not r["strategy"].startswith("2ndmatch") or same_jac]
        if same_jac and int(base["settings"]["seeds"].split(",")[0]) == int(args.seeds.split(",")[0]):
            profile = profile or base.get("sensitivity_profile", {}).get("2ndmatch")
    return reusable, profile


def stored_results(out: Path, settings: dict, overwrite: bool) -> dict:
    results = json.loads(out.read_text()) if out.exists() else {}
    if results and results.get("settings") != settings:
        if not overwrite:
            stored = results.get("settings", {})
            changed = sorted(k for k in {*settings, *stored} if settings.get(k) != stored.get(k))
            sys.exit(f"--out {out} holds runs with other settings (differing: {', '.join(changed)}); give another "
                     f"--out, the same settings to resume, or --overwrite to start it again")
        results = {}
    return results


class Benchmark:
    """The teacher, the pruned student, the sampling noise and the results being written."""

    def __init__(self, args: argparse.Namespace, teacher, results: dict, reusable: list[dict]) -> None:
        self.args, self.teacher, self.results, self.reusable = args, teacher, results, reusable
        self.out = Path(args.out)
        self.cache = Cache(self.out, results["settings"])
        self.commit = results["commit"]  # (record(): the checkout this run comes from)
        size = teacher.resolution
        self.noise = torch.randn(args.samples, 1, size, size,
                                 generator=torch.Generator().manual_seed(SAMPLE_NOISE_SEED))
        cached = self.cache.load("teacher_samples")
        self.teacher_samples = cached[0]["samples"] if cached else self.samples_of(teacher.model, self.noise)
        if not cached:
            self.cache.save("teacher_samples", {"samples": self.teacher_samples})
        with torch.no_grad():
            self.reference_features = teacher.classifier.features(teacher.test_images)
        results["dense"] = {"fid_mean": self.fid(self.teacher_samples)}
        self.student0, report = prune_diffusers(teacher.model, "magnitude", args.ratio,
                                                example_inputs=default_example_inputs(teacher.model), round_to=None)
        if "pruned" not in results:  # a resumed JSON holds it (same settings, deterministic)
            results["pruned"] = {**self.evaluate(copy.deepcopy(self.student0)), "macs_ratio": report["macs_ratio"],
                                 "params_ratio": report["params_ratio"]}
        self.x0 = teacher.train.images[:64]

    @torch.no_grad()
    def fid(self, samples) -> float:
        return frechet_distance(self.teacher.classifier.features(samples), self.reference_features)

    def samples_of(self, model, noise):
        """Deterministic samples: DDIM, or Euler for a flow-matching teacher's objective."""
        return sample(model, noise, self.args.ddim_steps, self.teacher.scheduler, self.args.sample_batch)

    def evaluate(self, model) -> dict[str, float]:
        samples = self.samples_of(model.eval(), self.noise)
        return {"fid": self.fid(samples), "fidelity": fidelity(samples, self.teacher_samples)}

    def evaluation_noise(self, name: str, model) -> None:
        """The evaluation's own spread: ``model`` scored on ``--eval-noise-draws`` other sample-noise
        draws; the std of its digits-FID, and of kd's minus it, draw by draw. Each draw is written
        as it is scored; the draws already in the JSON are not redone."""
        size, draws = self.teacher.resolution, self.args.eval_noise_draws
        section = self.results.setdefault("evaluation_noise", {"samples": self.args.samples, "draws": draws,
                                                                "fid": {}})
        fids = section["fid"]
        for i in range(len(fids.setdefault(name, [])), draws):
            fids[name].append(self.fid(self.samples_of(model, torch.randn(
                self.args.samples, 1, size, size, generator=torch.Generator().manual_seed(SAMPLE_NOISE_SEED + 1 + i)))))
            section["std"] = {n: statistics.stdev(v) for n, v in fids.items() if len(v) > 1}
            kd = fids.get("kd", [])
            section["std_kd_minus"] = {n: statistics.stdev(a - b for a, b in zip(kd, v))
                                       for n, v in fids.items() if n != "kd" and min(len(v), len(kd)) > 1}
            write(self.results, self.out)

    def run(self, budget: str, name: str, seed: int, steps: int) -> dict:
        done = self.results.setdefault(budget, {}).setdefault("runs", [])
        for r in done:
            if (r["strategy"], r["seed"], r["steps"]) == (name, seed, steps):
                return r
        for r in [*self.results.get("equal_steps", {}).get("runs", []), *self.reusable]:  # deterministic: reuse
            if (r["strategy"], r["seed"], r["steps"]) == (name, seed, steps):
                return self.record(budget, dict(r))
        tag = f"{budget}-{name}-{seed}-{steps}"
        cached = self.cache.load(tag)
        if cached:  # trained before a restart: only its evaluation is redone
            trained = copy.deepcopy(self.student0)
            trained.load_state_dict(cached[0])
            seconds = float(cached[1]["seconds"])
        else:
            trained, seconds = self.train(name, seed, steps)
            self.cache.save(tag, trained.state_dict(), seconds=repr(seconds))
        row = {"strategy": name, "seed": seed, "steps": steps, "seconds": seconds, **self.evaluate(trained),
               "commit": self.commit}
        if seed == int(self.args.seeds.split(",")[0]) and budget == "equal_steps":
            if name == "2ndmatch":
                self.results["sensitivity_profile"]["2ndmatch"] = sensitivity_profile(
                    trained, self.x0, PROFILE_TIMESTEPS, scheduler=self.teacher.scheduler)
            if self.args.eval_noise_draws > 1:
                self.evaluation_noise(name, trained)
        self.record(budget, row)
        self.cache.drop(tag)
        return row

    def train(self, name: str, seed: int, steps: int) -> tuple[torch.nn.Module, float]:
        """The pruned student finetuned by arm ``name``, and the seconds it took."""
        finetuner, arm_options = arm(name, jac_options(self.args))
        config = TrainConfig(steps=steps, batch_size=self.args.batch_size, lr=self.args.lr, seed=seed,
                             ema_decay=self.args.ema_decay, grad_clip=self.args.grad_clip, dropout=self.args.dropout,
                             checkpoint_every=10**9, log_every=max(1, steps // 10))
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            strategy = get_finetuner(finetuner, scheduler=self.teacher.scheduler, **arm_options)
            trained = finetune(copy.deepcopy(self.student0), self.teacher.model, strategy, self.teacher.train, config,
                               tmp, watch=Watch(progress=True)).student
        return trained, time.perf_counter() - start

    def record(self, budget: str, row: dict) -> dict:
        self.results[budget]["runs"].append(row)
        summarize_budget(self.results, budget)
        write(self.results, self.out)
        return row


def summarize(runs: list[dict], key: str) -> dict[str, float]:
    values = [r[key] for r in runs]
    return {f"{key}_mean": statistics.fmean(values), f"{key}_std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarize_budget(results: dict, budget: str) -> None:
    section = results[budget]
    names = list(dict.fromkeys(r["strategy"] for r in section["runs"]))
    table = {}
    for name in names:
        rows = sorted((r for r in section["runs"] if r["strategy"] == name), key=lambda r: r["seed"])
        table[name] = {"steps": rows[0]["steps"], "seconds": statistics.fmean(r["seconds"] for r in rows),
                       **summarize(rows, "fid"), **summarize(rows, "fidelity"), "seeds": len(rows)}
    section["strategies"] = table
    if "dsm" in table and "2ndmatch" in table:
        gap = table["dsm"]["fid_mean"] - results["dense"]["fid_mean"]
        section["gap_closed"] = (table["dsm"]["fid_mean"] - table["2ndmatch"]["fid_mean"]) / gap
        spread = max(table["dsm"]["fid_std"], table["2ndmatch"]["fid_std"])
        section["difference_over_2std"] = (table["dsm"]["fid_mean"] - table["2ndmatch"]["fid_mean"]) > 2 * spread
    pairs = [(base, name) for base in ("kd", "dsm") if base in table for name in table
             if name not in ("kd", "dsm") and (base == "kd" or name == "2ndmatch")]
    for key, field in (("paired", "fid"), ("paired_fidelity", "fidelity")):
        section[key] = {f"{base}_minus_{name}": paired(seed_differences(section["runs"], base, name, field))
                        for base, name in pairs}


def write(results: dict, out: Path) -> None:
    lines = ["# digits quality benchmark", "", f"Command: `{results['command']}`", "",
             f"Commit {results.get('commit')}, {results.get('cpu')}; teacher sha256 {results.get('teacher_sha256')}",
             "", f"Dense teacher digits-FID: {results['dense']['fid_mean']:.3f}; pruned before finetuning: "
             f"{results['pruned']['fid']:.3f} (MACs ratio {results['pruned']['macs_ratio']:.3f})", ""]
    if "evaluation_noise" in results:
        noise = results["evaluation_noise"]
        lines += [f"digits-FID's own noise (the first seed's models, {noise['draws']} sample-noise draws of "
                  f"{noise['samples']}): std " + ", ".join(f"{n} {v:.3f}" for n, v in noise["std"].items())
                  + "; of kd minus " + ", ".join(f"{n} {v:.3f}" for n, v in noise["std_kd_minus"].items()), ""]
    for budget in ("equal_steps", *BUDGET_KEYS.values()):
        table = results.get(budget, {}).get("strategies", {})
        if not table:
            continue
        lines += [f"## {budget.replace('_', ' ')}", "", "| arm | steps | seconds | digits-FID | fidelity (RMS) |",
                  "|---|---|---|---|---|"]
        lines += [f"| {name} | {row['steps']} | {row['seconds']:.0f} | {row['fid_mean']:.3f} ± {row['fid_std']:.3f} | "
                  f"{row['fidelity_mean']:.4f} ± {row['fidelity_std']:.4f} |" for name, row in table.items()]
        if "gap_closed" in results[budget]:
            lines += ["", f"gap closed: {results[budget]['gap_closed']:.3f}"]
        for key, what in (("paired", "digits-FID"), ("paired_fidelity", "fidelity")):
            for pair, d in results[budget].get(key, {}).items():
                name = pair.split("_minus_", 1)[1]
                lines.append(f"{pair} ({what}, positive: {name} better): {d['mean']:.4g} ± {d['std']:.4g} over "
                             f"{d['n']} seeds, 95% CI [{d['ci95'][0]:.4g}, {d['ci95'][1]:.4g}], {name} better on "
                             f"{d['wins']}, t {d['t']:.2f}, one-sided p {d['p_one_sided']:.3g}, two-sided "
                             f"{d['p_two_sided']:.3g}, Wilcoxon one-sided {d['p_wilcoxon']:.3g}")
        lines.append("")
    write_results(out, results, "\n".join(lines))


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    seeds = [int(s) for s in args.seeds.split(",")]
    try:
        teacher = load_teacher(args.data, args.teacher, args.dequantize)
    except ValueError as e:
        sys.exit(f"--teacher/--data: {e}")
    settings = settings_of(args, teacher.weights_sha256)
    reusable, base_profile = reusable_runs(args, settings)
    results = stored_results(out, settings, args.overwrite)
    results.update(settings=settings, **record(__file__), teacher_sha256=teacher.weights_sha256)
    bench = Benchmark(args, teacher, results, reusable)
    stored = results.get("sensitivity_profile", {})
    profile = {name: sensitivity_profile(model, bench.x0, PROFILE_TIMESTEPS, scheduler=teacher.scheduler)
               for name, model in (("teacher", teacher.model), ("pruned", bench.student0)) if name not in stored}
    results["sensitivity_profile"] = {**stored, "timesteps": PROFILE_TIMESTEPS, **profile}
    if base_profile:  # the baseline's first 2ndmatch run is this one's (same settings and seed)
        results["sensitivity_profile"].setdefault("2ndmatch", base_profile)
    write(results, out)

    compute_steps = settings["budget"]["steps"] if args.budget == "equal-compute" else {}
    for seed in seeds:  # interleaved by seed: every arm of a seed before the next seed
        for name in args.arms:
            bench.run("equal_steps", name, seed, args.steps)
        for name, steps in compute_steps.items():
            bench.run("equal_compute", name, seed, steps)
    if args.budget == "equal-wallclock" and not args.no_wallclock:
        per_step = {n: results["equal_steps"]["strategies"][n]["seconds"] / args.steps for n in args.arms}
        budget_s = per_step["2ndmatch"] * args.steps
        results.setdefault("equal_wallclock", {})["budget_seconds"] = budget_s
        for seed in seeds:
            for name in args.arms:
                bench.run("equal_wallclock", name, seed, max(1, round(budget_s / per_step[name])))
    # top level: the equal-steps comparison (per arm fid_mean, fid_std, fidelity_mean, steps, seconds)
    results.update(results["equal_steps"]["strategies"])
    results["gap_closed"] = results["equal_steps"].get("gap_closed")
    results["paired"] = results["equal_steps"].get("paired", {})
    write(results, out)
    print(out.with_suffix(".md").read_text())
    return results


if __name__ == "__main__":
    main(parse_args())
