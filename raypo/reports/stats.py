"""The statistics behind a verdict: intervals, the paired test, the multiple-comparison
correction and the effect size, all from scipy.stats.

A confirmation trains each finalist and its baseline under the same seeds. The seed fixes the
batch order, the initial values of learned loss parts and the evaluation's samples, so the two
runs of one seed share much of their noise; their difference is what the test looks at:

- per configuration: mean, standard deviation (ddof 1) and the 95% t-interval of the mean
  (`scipy.stats.ttest_1samp(...).confidence_interval`);
- per finalist: the paired differences d_i = finalist_i - baseline_i, their mean and 95%
  t-interval, and the two-sided paired t-test (`scipy.stats.ttest_rel`). The t-test, not the
  Wilcoxon signed-rank test: with the few seeds a confirmation can afford (5 by default) the
  smallest two-sided Wilcoxon p-value is 2 / 2^5 = 0.0625, so it could never report a
  difference at the 5% level; the t-test assumes roughly normal differences of a metric that is
  itself an average over many samples;
- the p-values of all finalists corrected together with Holm's step-down method (which keeps
  the family-wise error rate at 5% without assuming independence);
- the effect size Cohen's d_z = mean(d) / std(d), the paired-design d.

A metric with bounds (a share, a reward in [0, 1]: raypo.reports.schema.METRIC_BOUNDS) has
its intervals clipped to what it can take: the mean's to [low, high], the difference's to
[low - high, high - low]. The t-interval assumes a normal mean and reaches past a bound when
a few seeds sit near it; the clipped interval is the same interval intersected with the
possible values, and `ci_clipped` / `diff_ci_clipped` say that it happened.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import stats

LEVEL = 0.95
ALPHA = 0.05


def _clean(values) -> np.ndarray:
    x = np.asarray(list(values), dtype=float)
    return x[np.isfinite(x)]


def _clip(out: dict, prefix: str, bounds: tuple[float, float] | None) -> dict:
    """`out`'s interval `<prefix>ci_low/high` within `bounds`, and `<prefix>ci_clipped`."""
    out[f"{prefix}ci_clipped"] = False
    if bounds is None or math.isnan(out[f"{prefix}ci_low"]):
        return out
    low, high = bounds
    clipped_low = max(out[f"{prefix}ci_low"], low)
    clipped_high = min(out[f"{prefix}ci_high"], high)
    out[f"{prefix}ci_clipped"] = (clipped_low, clipped_high) != (out[f"{prefix}ci_low"],
                                                                 out[f"{prefix}ci_high"])
    out[f"{prefix}ci_low"], out[f"{prefix}ci_high"] = clipped_low, clipped_high
    return out


def summary(values, level: float = LEVEL, bounds: tuple[float, float] | None = None
            ) -> dict[str, float]:
    """`n`, `mean`, `std` (ddof 1) and the t-interval of the mean (`ci_low`, `ci_high`);
    NaN where the sample is too small (the interval needs two values). `bounds`: the
    metric's range, which the interval is clipped to (`ci_clipped`)."""
    x = _clean(values)
    n = len(x)
    out = {"n": n, "mean": float(x.mean()) if n else math.nan,
           "std": float(x.std(ddof=1)) if n > 1 else math.nan,
           "ci_low": math.nan, "ci_high": math.nan}
    if n > 1:
        if out["std"] == 0:
            out["ci_low"] = out["ci_high"] = out["mean"]
        else:
            ci = stats.ttest_1samp(x, 0.0).confidence_interval(level)
            out["ci_low"], out["ci_high"] = float(ci.low), float(ci.high)
    return _clip(out, "", bounds)


def paired(a, b, level: float = LEVEL, bounds: tuple[float, float] | None = None
           ) -> dict[str, float]:
    """The paired comparison of a with b (equal-length sequences, aligned by seed; pairs with
    a missing side are dropped): `n`, `diff_mean`, `diff_std`, `diff_ci_low/high` (t-interval
    of the mean difference, clipped to what a difference of a metric within `bounds` can
    be: `diff_ci_clipped`), `t`, `p` (two-sided ttest_rel) and `effect_size` (d_z).

    Identical samples (every difference 0) give p = 1 and the interval [0, 0]: no evidence of
    a difference, where scipy returns NaN."""
    a, b = np.asarray(list(a), dtype=float), np.asarray(list(b), dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired: samples of different lengths ({len(a)} and {len(b)})")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    d = a - b
    n = len(d)
    out = {"n": n, "diff_mean": float(d.mean()) if n else math.nan,
           "diff_std": float(d.std(ddof=1)) if n > 1 else math.nan,
           "diff_ci_low": math.nan, "diff_ci_high": math.nan, "t": math.nan, "p": math.nan,
           "effect_size": math.nan}
    span = None if bounds is None else (bounds[0] - bounds[1], bounds[1] - bounds[0])
    if n < 2:
        return _clip(out, "diff_", span)
    if np.all(d == 0):
        out.update(diff_ci_low=0.0, diff_ci_high=0.0, t=0.0, p=1.0, effect_size=0.0)
        return _clip(out, "diff_", span)
    with warnings.catch_warnings():  # near-identical samples: scipy warns, the value stands
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.ttest_rel(a, b)
        ci = result.confidence_interval(level)
    out.update(diff_ci_low=float(ci.low), diff_ci_high=float(ci.high),
               t=float(result.statistic), p=float(result.pvalue))
    if out["diff_std"] > 0:
        out["effect_size"] = out["diff_mean"] / out["diff_std"]
    else:
        out["effect_size"] = math.copysign(math.inf, out["diff_mean"])
    return _clip(out, "diff_", span)


def holm(pvalues) -> list[float]:
    """Holm's step-down adjustment: with p sorted ascending, p_adj_(i) = max over j <= i of
    min(1, (m - j + 1) p_(j)), returned in the input's order. A NaN p counts as 1."""
    p = np.array([1.0 if v is None or not math.isfinite(v) else float(v) for v in pvalues])
    m = len(p)
    if m == 0:
        return []
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted = np.maximum.accumulate(scaled)
    out = np.empty(m)
    out[order] = adjusted
    return out.tolist()


def one_way(groups) -> dict[str, float]:
    """How much of the variation between groups (pairs) stands above the variation within
    them (seeds): one-way ANOVA (`scipy.stats.f_oneway`: F and p) and the intraclass
    correlation ICC(1) = (MSB - MSW) / (MSB + (k - 1) MSW), k the mean group size (the share of
    the variance due to the group)."""
    groups = [_clean(g) for g in groups]
    groups = [g for g in groups if len(g)]
    if len(groups) < 2 or all(len(g) < 2 for g in groups):
        return {"F": math.nan, "p": math.nan, "icc": math.nan}
    result = stats.f_oneway(*groups)
    n = sum(len(g) for g in groups)
    k = n / len(groups)
    grand = np.concatenate(groups).mean()
    msb = sum(len(g) * (g.mean() - grand) ** 2 for g in groups) / (len(groups) - 1)
    msw = sum(((g - g.mean()) ** 2).sum() for g in groups) / (n - len(groups))
    icc = (msb - msw) / (msb + (k - 1) * msw) if msb + (k - 1) * msw > 0 else math.nan
    return {"F": float(result.statistic), "p": float(result.pvalue), "icc": float(icc)}
