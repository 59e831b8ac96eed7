"""Merge the runs of one teacher that two slots made side by side into one digits_quality.py JSON.

    python benchmarks/merge_seed_runs.py benchmarks/results/equal_compute/mnist.json \
        benchmarks/results/equal_compute/mnist_b.json --out benchmarks/results/equal_compute/mnist.json

The first JSON's run went through the seeds in order; each other one (``equal_compute_runs.sh
mnist-b``) took the same seeds from the last down, so that both slots work until they meet. Every
input must have the same settings but ``seeds``, the same teacher and the same dense and pruned
scores (the same deterministic start, to 0.1%); each other input's seeds must be among the first one's. A run
(arm, seed, steps) that both made is taken from the first JSON, and the two scores are recorded side
by side (training is deterministic on one thread: they should agree; a warning names any that do
not). The summaries and the paired statistics are computed again from the merged runs, as
digits_quality.py computes them, and ``merged_from`` records what each input added (a merged JSON
merged again keeps its earlier records). The verdict then reads the merged JSON as one run's.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.digits_quality import summarize_budget, write  # noqa: E402

BUDGETS = ("equal_steps", "equal_compute")


def merge(first: dict, others: list[tuple[str, dict]]) -> dict:
    """``first`` with the runs of each ``(name, results)`` of ``others`` added; a ValueError names
    what does not match."""
    merged = copy.deepcopy(first)
    seeds = {int(s) for s in first["settings"]["seeds"].split(",")}
    merged.setdefault("merged_from", [])  # a merged JSON merged again keeps what it recorded
    merged.setdefault("duplicates", [])
    for name, other in others:
        differing = sorted(k for k in {*first["settings"], *other["settings"]} if k != "seeds"
                           and first["settings"].get(k) != other["settings"].get(k))
        if differing:
            raise ValueError(f"{name}: settings differ from the first JSON's in {', '.join(differing)}")
        if other.get("teacher_sha256") != first.get("teacher_sha256"):
            raise ValueError(f"{name}: teacher sha256 {other.get('teacher_sha256')}, the first JSON's "
                             f"{first.get('teacher_sha256')}: another teacher")
        for what, mine, theirs in (("dense fid_mean", first["dense"]["fid_mean"], other["dense"]["fid_mean"]),
                                   ("pruned fid", first["pruned"]["fid"], other["pruned"]["fid"])):
            if not _close(mine, theirs):  # (evaluated again at each start: CPUs differ a little)
                raise ValueError(f"{name}: {what} is {theirs!r}, the first JSON's {mine!r}: not the same start")
        extra = sorted({int(s) for s in other["settings"]["seeds"].split(",")} - seeds)
        if extra:
            raise ValueError(f"{name}: seeds {extra} are not among the first JSON's ({first['settings']['seeds']})")
        added = 0
        for budget in BUDGETS:
            runs = merged.setdefault(budget, {}).setdefault("runs", [])
            have = {(r["strategy"], r["seed"], r["steps"]): r for r in runs}
            for run in other.get(budget, {}).get("runs", []):
                key = (run["strategy"], run["seed"], run["steps"])
                if key in have:
                    merged["duplicates"].append({"budget": budget, "strategy": key[0], "seed": key[1],
                                                 "fid": [have[key]["fid"], run["fid"]],
                                                 "fidelity": [have[key]["fidelity"], run["fidelity"]]})
                else:
                    runs.append(run)
                    have[key] = run
                    added += 1
        merged["merged_from"].append({"file": name, "command": other.get("command"), "commit": other.get("commit"),
                                      "cpu": other.get("cpu"), "runs_added": added})
    for budget in BUDGETS:
        if merged.get(budget, {}).get("runs"):
            merged[budget]["runs"].sort(key=lambda r: (r["seed"], r["strategy"]))
            summarize_budget(merged, budget)
    merged.update(merged["equal_steps"]["strategies"])  # the top level, as digits_quality.py writes it
    merged["paired"] = merged["equal_steps"].get("paired", {})
    return merged


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("first", help="the JSON whose run went through the seeds in order")
    p.add_argument("others", nargs="+", help="JSONs of the same settings over some of its seeds")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    missing = [f for f in (args.first, *args.others) if not Path(f).is_file()]
    if missing:
        p.error(f"{missing[0]}: no such file")
    first = json.loads(Path(args.first).read_text())
    try:
        merged = merge(first, [(Path(o).name, json.loads(Path(o).read_text())) for o in args.others])
    except ValueError as e:  # inputs that are not one teacher's runs: nothing is written
        p.error(str(e))
    for d in merged["duplicates"][len(first.get("duplicates", [])):]:  # this merge's
        if not all(_close(*d[key]) for key in ("fid", "fidelity")):
            print(f"warning: {d['budget']} {d['strategy']} seed {d['seed']} was run by two slots with other scores "
                  f"(fid {d['fid']}, fidelity {d['fidelity']}); the first JSON's is kept", file=sys.stderr)
    write(merged, Path(args.out))
    return merged


def _close(a: float, b: float) -> bool:
    """The same score up to the evaluation's last bits on another CPU (the tolerance of the starts)."""
    return abs(a - b) <= 1e-3 * max(1.0, abs(a))


if __name__ == "__main__":
    main()
