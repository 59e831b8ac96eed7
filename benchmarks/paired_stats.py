"""Paired statistics of the quality benchmarks: one arm against a baseline, seed by seed, and pooled
over teachers with the teacher as a stratum; Holm's correction for the settings compared.

Differences are baseline minus arm (digits-FID or fidelity, both lower-is-better): positive means
the arm is better. One-sided p-values test "the arm is better".
"""

from __future__ import annotations

import math
import statistics


def seed_differences(runs: list[dict], base: str, name: str, key: str) -> list[float]:
    """``base`` minus ``name`` in ``key``, seed by seed over the runs (dicts with strategy, seed, key)
    both arms have, in seed order."""
    by = {(r["strategy"], r["seed"]): r[key] for r in runs}
    return [by[(base, s)] - by[(name, s)] for (n, s) in sorted(by) if n == base and (name, s) in by]


def paired(diffs: list[float]) -> dict[str, float]:
    """n, mean, std, paired t with one- and two-sided p, the one-sided Wilcoxon signed-rank p,
    wins (diffs > 0) and the 95% t interval of the mean."""
    from scipy import stats

    n = len(diffs)
    mean = statistics.fmean(diffs) if n else math.nan
    std = statistics.stdev(diffs) if n > 1 else math.nan
    se = std / math.sqrt(n) if n > 1 else math.nan
    t = mean / se if n > 1 and se > 0 else math.nan
    half = float(stats.t.ppf(0.975, n - 1)) * se if n > 1 else math.nan
    wilcoxon = float(stats.wilcoxon(diffs, alternative="greater").pvalue) if n > 1 and any(diffs) else math.nan
    return {"n": n, "mean": mean, "std": std, "t": t,
            "p_one_sided": float(stats.t.sf(t, n - 1)) if math.isfinite(t) else math.nan,
            "p_two_sided": float(2 * stats.t.sf(abs(t), n - 1)) if math.isfinite(t) else math.nan,
            "p_wilcoxon": wilcoxon, "wins": sum(d > 0 for d in diffs), "ci95": [mean - half, mean + half]}


def stratified(strata: dict[str, list[float]]) -> dict[str, object]:
    """The pooled mean difference with each stratum (teacher) weighted by its number of pairs,
    its standard error from the within-stratum variances (so differences between teachers add no
    noise), Welch-Satterthwaite degrees of freedom, t, one- and two-sided p and the 95% interval;
    ``strata`` holds each stratum's own ``paired`` statistics."""
    from scipy import stats

    few = {k: len(d) for k, d in strata.items() if len(d) < 2}
    if few:
        raise ValueError(f"strata {few} have fewer than 2 pairs: a stratum's variance needs at least 2")
    total = sum(len(d) for d in strata.values())
    weights = {k: len(d) / total for k, d in strata.items()}
    mean = sum(weights[k] * statistics.fmean(d) for k, d in strata.items())
    parts = {k: weights[k] ** 2 * statistics.variance(d) / len(d) for k, d in strata.items()}
    variance = sum(parts.values())
    df = variance ** 2 / sum(parts[k] ** 2 / (len(d) - 1) for k, d in strata.items()) if variance > 0 else math.nan
    se = math.sqrt(variance)
    t = mean / se if se > 0 else math.nan
    half = float(stats.t.ppf(0.975, df)) * se if se > 0 else math.nan
    return {"n": total, "mean": mean, "se": se, "df": df, "t": t,
            "p_one_sided": float(stats.t.sf(t, df)) if math.isfinite(t) else math.nan,
            "p_two_sided": float(2 * stats.t.sf(abs(t), df)) if math.isfinite(t) else math.nan,
            "ci95": [mean - half, mean + half], "strata": {k: paired(d) for k, d in strata.items()}}


def holm(pvalues: dict[str, float]) -> dict[str, float]:
    """Holm's step-down adjustment of a family of p-values (each <= 1, monotone in the raw order); a
    p-value that could not be computed (NaN) counts as 1."""
    pvalues = {k: 1.0 if math.isnan(p) else p for k, p in pvalues.items()}
    order = sorted(pvalues, key=pvalues.get)
    adjusted, running = {}, 0.0
    for i, key in enumerate(order):
        running = max(running, min(1.0, (len(order) - i) * pvalues[key]))
        adjusted[key] = running
    return adjusted
