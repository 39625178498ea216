"""Heavy-Tailed Self-Regularization (HT-SR): the power-law exponent alpha of each weight matrix.

Martin & Mahoney, "Implicit Self-Regularization in Deep Neural Networks" (arXiv 1810.01075)
and "Predicting trends in the quality of state-of-the-art neural networks without access to
training or testing data" (arXiv 2002.06716); the metric WeightWatcher reports as `alpha`.

For each weight matrix W (N x M, N >= M) take the empirical spectral density (ESD): the
eigenvalues lambda_i = s_i^2 / N of X = W^T W / N, s_i the singular values of W. Training
pushes the tail of the ESD from Marchenko-Pastur (random, bounded bulk) towards a power law
    p(lambda) ~ lambda^-alpha,   lambda >= xmin,
and alpha in about [2, 6] reads as a well-trained layer (smaller: heavier tail, more
correlation learned; above 6: close to random). alpha is fitted by maximum likelihood with
the `powerlaw` package, xmin chosen by minimising the Kolmogorov-Smirnov distance D between
the tail and the fit (Clauset, Shalizi & Newman 2009).

By default the fit is untruncated (no xmax), as in WeightWatcher: a random matrix then gets
a large alpha and a poor fit (large D), because a pure power law cannot end where the
Marchenko-Pastur bulk ends. Truncating the fit at the largest eigenvalue (`truncated=True`,
xmax = max(lambda)) lets a bounded power law describe the bulk's edge, and a Gaussian matrix
then reads alpha of about 1.5 with a good fit: heavy-tailed, which it is not (see the tests).
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import powerlaw
import torch
from torch import nn

DEFAULT_MIN_DIM = 16
WELL_TRAINED = (2.0, 6.0)  # the HT-SR band of well-trained layers, both ends included

# Eigenvalues below this fraction of the largest are zero up to rounding (rank-deficient W).
ZERO_EIGENVALUE = 1e-12

# powerlaw >= 2.0 bounds alpha to (0, 3) by default, which would clip every layer above 3;
# alpha > 1 is what makes an untruncated power law normalisable, and there is no upper bound.
ALPHA_RANGE = {"alpha": [1.0, None]}


def layer_alphas(model: nn.Module, min_dim: int = DEFAULT_MIN_DIM, *,
                 truncated: bool = False) -> list[dict[str, Any]]:
    """alpha of every 2-D parameter of `model` whose smaller side is at least `min_dim`.

    Embeddings and the LM head are included (they are weight matrices too); a tied LM head
    appears once, under the embedding's name. Returns one dict per matrix, in parameter
    order: `name`, `shape`, `alpha`, `xmin`, `num_eigs` (nonzero eigenvalues), `num_tail`
    (eigenvalues >= xmin), `ks_distance` (D of the fit). A matrix whose tail cannot be fitted
    gets nan in the fit's fields rather than stopping the whole model.
    """
    rows = []
    for name, param in model.named_parameters():
        if param.ndim != 2 or min(param.shape) < min_dim:
            continue
        eigs = esd(param)
        rows.append({"name": name, "shape": tuple(param.shape), "num_eigs": len(eigs),
                     **fit_power_law(eigs, truncated=truncated)})
    return rows


def esd(weight: torch.Tensor) -> np.ndarray:
    """Nonzero eigenvalues of W^T W / N (N the larger side), ascending, in float64."""
    matrix = weight.detach().to(torch.float64)
    eigs = (torch.linalg.svdvals(matrix) ** 2 / max(matrix.shape)).cpu().numpy()
    eigs = np.sort(eigs)
    if len(eigs) == 0 or eigs[-1] <= 0:
        return eigs[:0]
    return eigs[eigs > ZERO_EIGENVALUE * eigs[-1]]


def fit_power_law(eigs: np.ndarray, *, truncated: bool = False) -> dict[str, float]:
    """MLE fit of p(lambda) ~ lambda^-alpha to the tail of `eigs`, xmin by the KS method.

    Returns `alpha`, `xmin`, `num_tail`, `ks_distance`; all nan when the fit is impossible
    (too few distinct eigenvalues) or powerlaw finds no xmin with a valid alpha.
    """
    failed = {"alpha": math.nan, "xmin": math.nan, "num_tail": 0, "ks_distance": math.nan}
    if len(np.unique(eigs)) < 3:
        return failed
    try:
        fit = _powerlaw_fit(eigs, xmax=float(eigs[-1]) if truncated else None)
    except (ValueError, ArithmeticError, IndexError, RuntimeError):
        # powerlaw fails in assorted ways on degenerate spectra; one matrix must not stop
        # the model's report
        return failed
    if fit is None:
        return failed
    return fit


def _powerlaw_fit(eigs: np.ndarray, xmax: float | None) -> dict[str, float] | None:
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        # powerlaw warns for every candidate xmin it rejects, even with verbose=False
        warnings.simplefilter("ignore")
        fit = powerlaw.Fit(eigs, xmax=xmax, xmin_distance="D", parameter_ranges=ALPHA_RANGE,
                           verbose=False)
        if not np.isfinite(fit.xmin) or fit.noise_flag:
            return None
        alpha, distance = float(fit.power_law.alpha), float(fit.power_law.D)
    if not (np.isfinite(alpha) and np.isfinite(distance)):
        return None
    return {"alpha": alpha, "xmin": float(fit.xmin), "num_tail": int(fit.n_tail),
            "ks_distance": distance}


def summarize(alphas: Iterable[Mapping[str, Any] | float]) -> dict[str, float | int]:
    """Model-level statistics of per-matrix alphas (rows of `layer_alphas`, or plain numbers).

    nan alphas (matrices that could not be fitted) are left out; `layers` counts the matrices
    that were kept, and `share_in_2_6` is the share of them with 2 <= alpha <= 6. With none
    left every statistic is nan and `layers` is 0.
    """
    values = [float(a["alpha"] if isinstance(a, Mapping) else a) for a in alphas]
    values = [v for v in values if math.isfinite(v)]
    if not values:
        nan = math.nan
        return {"alpha_mean": nan, "alpha_median": nan, "alpha_min": nan, "alpha_max": nan,
                "share_in_2_6": nan, "layers": 0}
    low, high = WELL_TRAINED
    return {
        "alpha_mean": statistics.fmean(values),
        "alpha_median": statistics.median(values),
        "alpha_min": min(values),
        "alpha_max": max(values),
        "share_in_2_6": sum(low <= v <= high for v in values) / len(values),
        "layers": len(values),
    }
