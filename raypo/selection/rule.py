"""The selection rule: from the metrics of raypo.selection.metrics to a ranking of the
kernel-divergence pairs (every candidate kernel x every candidate divergence of the registries:
raypo.losses.kernel_candidates, divergence_candidates), 1 = best.

DPO-Kernels (arXiv 2501.03271) selects a pair from data statistics without publishing its
formulas; this rule is the project's own, and it is measured: benchmarks/selection.py trains
full grids of the pairs under several seeds on several task settings and scores the rule on
settings it was not fitted on (docs/selection.md has the figures and where it fails). It is a
prior for where a search looks first, never a verdict: the confirmation stage
(raypo.search.confirm) is what says whether the chosen variant beats DPO.

Per pair (k, d), from metrics computed on the reference model before any training:

    saturation_k = tanh(gamma * margin_std_k / 2)
        The hybrid loss adds gamma * (log K(x, w) - log K(x, l)) to DPO's margin, which starts
        at 0. A kernel margin whose spread is large at the loss's gamma puts the sigmoid in
        saturation for most pairs before training starts: the kernel's opinion then drowns
        the preference signal (Mahalanobis, spread ~80 on the built-in task, barely trains).
    strength_d = log penalty_strength_d
        How hard the divergence, at its defaults, pushes back on a confidence shift of the
        reference's own next-token distributions (raypo.selection.metrics.penalty_strength).
        At the same alpha_div a strong penalty holds the policy near the reference; on the
        benchmark's settings that kept unstable kernels from collapsing, and a weak one
        (JS, Hellinger, Bhattacharyya) did not.

    S = W_SATURATION * z(saturation) + W_STRENGTH * z(strength)

z standardises a feature across this data's candidate pairs (a feature equal for all gives
0). The weights are the least-squares fit of the z-scored seed-mean objective on the z-scored
features over the benchmark's settings (the figures in docs/selection.md are leave-one-
setting-out: each setting scored by weights fitted on the others). Two other features were
measured and left out: the kernel's ordering accuracy and signal-to-noise ratio on the
reference embeddings (the margins of the kernels pointed the wrong way on the `length` variant
and still trained best there: the policy's embeddings move) and a boundedness of each
divergence set by hand (what the strength already measures, with the data's own distributions;
only benchmarks/selection.py keeps those numbers, for the previous rule it measures).

`confidence` (one value per table): an approximate probability that the top pick beats the
fourth, Phi((S_1 - S_4) / (sqrt(2) RESIDUAL_SD)), with RESIDUAL_SD the fit's residual standard
deviation in z units. A table whose features barely differ between candidates says 0.5: the
rule has nothing to go on.

Ranking: by S, highest first; ties are broken by the registries' order of the kernels, then of
the divergences. A metric that is NaN (undefined on the data) makes its feature neutral (z 0).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

from raypo.losses import DIVERGENCES, KERNELS, divergence_candidates, kernel_candidates

GAMMA = 0.1  # the gamma a kernel's margin is judged at when the caller gives none
# Fitted by benchmarks/selection.py on its six settings (docs/selection.md).
W_SATURATION = -0.723
W_STRENGTH = 0.111
RESIDUAL_SD = 0.682
FEATURES = ("saturation", "strength")


def check_candidate(name: str) -> None:
    """ValueError unless divergence `name` is registered and a selection candidate."""
    if not DIVERGENCES.get_class(name).candidate:  # an unknown name fails here, listing them
        raise ValueError(f"rank_pairs: divergence {name!r} is not a selection candidate; "
                         f"the candidates are {', '.join(divergence_candidates())}")


def _metric(metrics: dict[str, float], key: str, owner: str) -> float:
    if key not in metrics:
        raise ValueError(f"rank_pairs: metrics of {owner} lack {key!r}; "
                         f"got {', '.join(sorted(metrics)) or '(none)'}")
    return float(metrics[key])


def features(kernel_metrics: dict[str, dict[str, float]],
             divergence_metrics: dict[str, dict[str, float]],
             gamma: float = GAMMA) -> dict[tuple[str, str], dict[str, float]]:
    """Per (kernel, divergence) pair, the quantities a fitted rule may weigh (NaN where a
    metric is undefined): `saturation` = tanh(gamma margin_std / 2) and `strength` = log
    penalty strength (the rule's), and `accuracy` = 2 accuracy - 1, `snr` = tanh(snr) of the
    kernel (measured in the benchmark, not used). ValueError for a divergence that is not a
    selection candidate."""
    out = {}
    for k, km in kernel_metrics.items():
        spread = _metric(km, "margin_std", k)
        for d, dm in divergence_metrics.items():
            strength = _metric(dm, "strength", d)
            check_candidate(d)
            out[(k, d)] = {
                "saturation": math.tanh(gamma * spread / 2.0),
                "strength": math.log(strength) if strength > 0 else math.nan,
                "accuracy": 2.0 * float(km.get("accuracy", math.nan)) - 1.0,
                "snr": math.tanh(float(km.get("snr", math.nan))),
            }
    return out


def zscore(values) -> np.ndarray:
    """(x - mean) / std over the finite values; NaN and constant features give 0."""
    x = np.asarray(values, dtype=float)
    finite = np.isfinite(x)
    # equal values (up to the rounding of their mean) carry no information
    if finite.sum() < 2 or x[finite].std() <= 1e-12 * max(1.0, float(np.abs(x[finite]).max())):
        return np.zeros_like(x)
    z = (x - x[finite].mean()) / x[finite].std()
    return np.where(finite, z, 0.0)


def _order(name: str, names: tuple[str, ...]) -> tuple[int, str]:
    return (names.index(name), "") if name in names else (len(names), name)


def rank_pairs(kernel_metrics: dict[str, dict[str, float]],
               divergence_metrics: dict[str, dict[str, float]],
               gamma: float = GAMMA) -> pd.DataFrame:
    """One row per (kernel, divergence) pair, sorted by `predicted_rank` (1 = best).

    Columns: `kernel`, `divergence`, `predicted_rank` (int), `score` (S), its two parts
    `kernel_score` and `divergence_score`, the features `saturation` and `strength`,
    `confidence` (the same in every row), `gamma` and every given metric as
    `kernel_<metric>` / `divergence_<metric>`. Deterministic: ties go to the
    registries' order of the candidate kernels then divergences (others after, by name).
    """
    if not kernel_metrics or not divergence_metrics:
        raise ValueError("rank_pairs: need metrics for at least one kernel and one divergence")
    for name in kernel_metrics:
        KERNELS.get_class(name)  # an unknown kernel name fails here, listing the known ones
    feats = features(kernel_metrics, divergence_metrics, gamma)
    pairs = list(feats)
    saturation = zscore([feats[p]["saturation"] for p in pairs])
    strength = zscore([feats[p]["strength"] for p in pairs])
    rows = []
    for i, (k, d) in enumerate(pairs):
        row = {"kernel": k, "divergence": d,
               "score": W_SATURATION * saturation[i] + W_STRENGTH * strength[i],
               "kernel_score": W_SATURATION * saturation[i],
               "divergence_score": W_STRENGTH * strength[i],
               "saturation": feats[(k, d)]["saturation"], "strength": feats[(k, d)]["strength"],
               "gamma": float(gamma)}
        row.update({f"kernel_{key}": float(v) for key, v in kernel_metrics[k].items()})
        row.update({f"divergence_{key}": float(v) for key, v in divergence_metrics[d].items()})
        rows.append(row)
    # rounded for the sort only: scores equal up to float rounding count as ties
    kernels, divergences = kernel_candidates(), divergence_candidates()
    rows.sort(key=lambda r: (-round(r["score"], 12), _order(r["kernel"], kernels),
                             _order(r["divergence"], divergences)))
    table = pd.DataFrame(rows)
    table.insert(2, "predicted_rank", range(1, len(rows) + 1))
    table["confidence"] = confidence(table["score"].to_numpy())
    return table.reset_index(drop=True)


def confidence(scores) -> float:
    """Phi((S_1 - S_4) / (sqrt(2) RESIDUAL_SD)) of scores sorted best first (module
    docstring); with fewer than four candidates, against the last."""
    s = np.sort(np.asarray(scores, dtype=float))[::-1]
    if len(s) < 2:
        return math.nan
    gap = s[0] - s[min(3, len(s) - 1)]
    return float(stats.norm.cdf(gap / (math.sqrt(2.0) * RESIDUAL_SD)))
