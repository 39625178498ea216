"""The selection rule: from the metrics of raypo.selection.metrics to a ranking of the
kernel-divergence pairs (the registries' candidates: 4 kernels x 7 divergences), 1 = best.

The rule is the project's own (DPO-Kernels, arXiv 2501.03271, selects from data statistics but
does not publish its formulas); it is a prior for where the search looks first, and the search
records each trial's predicted rank so the rule can be checked against what training finds.

Kernel score, in [-3, 2]:
    S_k = (2 * accuracy - 1) + tanh(snr) - tanh(GAMMA * margin_std / 2)
The hybrid loss adds gamma * (log K(x, w) - log K(x, l)) to DPO's margin: a kernel whose margin
already points to the chosen response on most triplets (accuracy) and consistently so (snr, the
margin's mean over its spread, so scale-free) adds signal from the first step; one below
chance adds noise against the preference. The last term is the size of that addition at the
loss's default gamma (GAMMA = 0.1): DPO's own margin starts at 0, so a kernel margin whose
spread is several units puts the sigmoid in saturation for most pairs before training starts,
and whatever the kernel gets wrong then dominates the gradient. (Added after the quickstart's
first searches: the Mahalanobis kernel, least wrong on ordering but with a margin spread of
~50, was ranked first and trained worst.)

Divergence score, with the divergence's profile (b, s, g) (its class's `profile`) and the data's
metrics (coverage c, normalised entropy H, drift D, tail heaviness T below):
    S_d = (2b - 1)(2T - 1)            tails: heavy tails favour bounded divergences, light
                                      tails the unbounded ones (sharper, DPO's own KL family)
        - s (1 - c)                   truncated support: the mass the cached support misses
                                      makes a support-hungry divergence untrustworthy
        + D (g - (1 - b) / 2)         drift: moving much mass per token suits a transport
                                      cost, and costs an unbounded divergence most
        - (1 - b)(1 - H) / 2          peakedness: near-zero reference mass makes log P/Q of an
                                      unbounded divergence explode
    T = (T_kurt + T_tail) / 2, T_kurt = 1 - 3 / max(kurtosis, 3), T_tail = m / (m + 0.046),
with m the tail mass. Both halves are 0.5 for a Laplace sample (kurtosis 6, tail mass 0.046),
the boundary between "light" and "heavy"; a Gaussian gives T_kurt = 0 and T_tail = 0.055.

Pair score: S = S_k + S_d. The kernel acts through the loss's semantic margin and the
divergence through its penalty, two terms that add in the loss, so their scores add.

Ranking: by S, highest first; ties (divergences that share a profile tie on every dataset)
are broken by the registries' order of the kernels, then of the divergences. A metric that
is NaN (undefined on the data, e.g. the kurtosis of a constant) takes its `NEUTRAL` value,
which moves no score in either direction.
"""

from __future__ import annotations

import math

import pandas as pd

from raypo.losses import DIVERGENCES, KERNELS, divergence_candidates, kernel_candidates
from raypo.losses.describe import SelectionProfile

# Each divergence class declares its profile (boundedness b, support reliance s, geometry g),
# each in [0, 1] (raypo.losses.describe.SelectionProfile):
#   b: 1 when the token-level value is bounded (JS <= log 2, H^2 <= 1, Sinkhorn <= the cost's
#      diameter 2), 0.5 for Bhattacharyya = -log(1 - H^2) (unbounded only as the supports
#      become disjoint), 0 for the KL family.
#   s: 1 when every token's log-ratio counts without a bound (the KL family) or when only the
#      top k tokens are transported (Wasserstein); 0.5 when bounded per-token terms make the
#      mass outside the support matter less.
#   g: 1 for a divergence that uses the geometry between tokens (Wasserstein).


def profile(name: str) -> SelectionProfile:
    """The selection profile of divergence `name`; ValueError if it is not a candidate."""
    found = DIVERGENCES.get_class(name).profile
    if found is None:
        raise ValueError(f"rank_pairs: no selection profile for divergence {name!r}; "
                         f"the candidates are {', '.join(divergence_candidates())}")
    return found


LAPLACE_TAIL_MASS = 0.046  # P(|x| > 3 * 1.4826 * MAD) for a Laplace sample

# Values a NaN metric takes: each makes its term of the score vanish (or stay at chance).
NEUTRAL = {"accuracy": 0.5, "snr": 0.0, "margin_std": 0.0, "coverage": 1.0, "entropy": 1.0,
           "drift": 0.0, "kurtosis": 6.0, "tail_mass": LAPLACE_TAIL_MASS}

KERNEL_KEYS = ("accuracy", "snr", "margin_std")
GAMMA = 0.1  # kernel_dpo's default weight of the kernel margin
DIVERGENCE_KEYS = ("coverage", "entropy", "kurtosis", "tail_mass", "drift")


def _value(metrics: dict[str, float], key: str, owner: str) -> float:
    if key not in metrics:
        raise ValueError(f"rank_pairs: metrics of {owner} lack {key!r}; "
                         f"got {', '.join(sorted(metrics)) or '(none)'}")
    value = float(metrics[key])
    return NEUTRAL[key] if math.isnan(value) else value


def kernel_score(metrics: dict[str, float], name: str = "kernel", gamma: float = GAMMA) -> float:
    """S_k = (2 accuracy - 1) + tanh(snr) - tanh(gamma margin_std / 2) (module docstring)."""
    accuracy = _value(metrics, "accuracy", name)
    snr = _value(metrics, "snr", name)
    spread = _value(metrics, "margin_std", name)
    return (2.0 * accuracy - 1.0) + math.tanh(snr) - math.tanh(gamma * spread / 2.0)


def tail_heaviness(kurtosis: float, tail_mass: float) -> float:
    """T = (T_kurt + T_tail) / 2 in [0, 1): T_kurt = 1 - 3 / max(kurtosis, 3),
    T_tail = m / (m + 0.046); 0.5 for a Laplace sample, about 0.03 for a Gaussian one."""
    t_kurt = 1.0 - 3.0 / max(kurtosis, 3.0)
    t_tail = tail_mass / (tail_mass + LAPLACE_TAIL_MASS) if tail_mass > 0 else 0.0
    return 0.5 * (t_kurt + t_tail)


def divergence_score(metrics: dict[str, float], name: str) -> float:
    """S_d for candidate divergence `name` on the data's metrics (module docstring)."""
    b, s, g = profile(name)
    c, h, d = (_value(metrics, key, name) for key in ("coverage", "entropy", "drift"))
    t = tail_heaviness(_value(metrics, "kurtosis", name), _value(metrics, "tail_mass", name))
    return ((2 * b - 1) * (2 * t - 1) - s * (1 - c) + d * (g - (1 - b) / 2)
            - (1 - b) * (1 - h) / 2)


def _order(name: str, names: tuple[str, ...]) -> tuple[int, str]:
    return (names.index(name), "") if name in names else (len(names), name)


def rank_pairs(kernel_metrics: dict[str, dict[str, float]],
               divergence_metrics: dict[str, dict[str, float]],
               gamma: float = GAMMA) -> pd.DataFrame:
    """One row per (kernel, divergence) pair, sorted by `predicted_rank` (1 = best).

    Columns: `kernel`, `divergence`, `predicted_rank` (int), `score` (S_k + S_d),
    `kernel_score`, `divergence_score`, `divergence_heaviness` (T), `divergence_boundedness`,
    `divergence_support`, `divergence_geometry` (the profile), and every given metric as
    `kernel_<metric>` / `divergence_<metric>`. Deterministic: ties go to the registries' order
    of the candidate kernels then divergences (names outside them after, alphabetically).
    """
    if not kernel_metrics or not divergence_metrics:
        raise ValueError("rank_pairs: need metrics for at least one kernel and one divergence")
    for name in kernel_metrics:
        KERNELS.get_class(name)  # an unknown kernel name fails here, listing the known ones
    k_scores = {k: kernel_score(m, k, gamma) for k, m in kernel_metrics.items()}
    d_scores = {d: divergence_score(m, d) for d, m in divergence_metrics.items()}
    rows = []
    for k, k_m in kernel_metrics.items():
        for d, d_m in divergence_metrics.items():
            b, s, g = profile(d)
            heaviness = tail_heaviness(_value(d_m, "kurtosis", d), _value(d_m, "tail_mass", d))
            row = {"kernel": k, "divergence": d, "score": k_scores[k] + d_scores[d],
                   "kernel_score": k_scores[k], "divergence_score": d_scores[d],
                   "divergence_heaviness": heaviness, "divergence_boundedness": b,
                   "divergence_support": s, "divergence_geometry": g}
            row.update({f"kernel_{key}": float(v) for key, v in k_m.items()})
            row.update({f"divergence_{key}": float(v) for key, v in d_m.items()})
            rows.append(row)
    # rounded for the sort only: scores equal up to float rounding count as ties
    kernels, divergences = kernel_candidates(), divergence_candidates()
    rows.sort(key=lambda r: (-round(r["score"], 12), _order(r["kernel"], kernels),
                             _order(r["divergence"], divergences)))
    table = pd.DataFrame(rows)
    table.insert(2, "predicted_rank", range(1, len(rows) + 1))
    return table.reset_index(drop=True)
