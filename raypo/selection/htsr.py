"""Heavy-Tailed Self-Regularization (HT-SR): the power-law exponent alpha of each weight matrix.

Martin & Mahoney, "Implicit Self-Regularization in Deep Neural Networks" (arXiv 1810.01075)
and "Predicting trends in the quality of state-of-the-art neural networks without access to
training or testing data" (arXiv 2002.06716); the metric WeightWatcher reports as `alpha`.

For each weight matrix W (N x M, N >= M) take the empirical spectral density (ESD): the
eigenvalues lambda_i = s_i^2 / N of X = W^T W / N, s_i the singular values of W. Training
pushes the tail of the ESD from Marchenko-Pastur (random, bounded bulk) towards a power law
    p(lambda) ~ lambda^-alpha,   lambda >= xmin,
and alpha in about [2, 6] reads as a well-trained layer (smaller: heavier tail, more
correlation learned; above 6: close to random). alpha is fitted by maximum likelihood, xmin
chosen by minimising the Kolmogorov-Smirnov distance D between the tail and the fit (Clauset,
Shalizi & Newman 2009), as the `powerlaw` package does it.

The default (untruncated) fit is that same estimator, the one `powerlaw.Fit(eigs,
xmin_distance="D", parameter_ranges={"alpha": [1, None]})` implements, computed here for all
candidate xmin at once in numpy (`_untruncated_fit`): powerlaw fits one candidate at a time
(a Python object and, for alpha outside (1.5, 3], a scipy optimisation each), which took
~0.1 s per matrix and seconds per model, a large share of a short search trial that reports
alpha at its end; the vectorised fit gives the same alpha, xmin and D (the tests compare them
with powerlaw's) in about a millisecond per matrix. The truncated fit still calls powerlaw.

By default the fit is untruncated (no xmax), as in WeightWatcher: a random matrix then gets
a large alpha and a poor fit (large D), because a pure power law cannot end where the
Marchenko-Pastur bulk ends. Truncating the fit at the largest eigenvalue (`truncated=True`,
xmax = max(lambda)) lets a bounded power law describe the bulk's edge, and a Gaussian matrix
then reads alpha of about 1.5 with a good fit: heavy-tailed, which it is not (see the tests).

Which matrices (`weight_matrices`): `cover="layers"` reads the transformer blocks' weight
matrices only, `cover="all"` every 2-D weight, embeddings and LM head included. A LoRA (peft)
layer counts as one matrix, its base weight plus the active adapters' update (the weight its
forward applies); the adapters' own factors lora_A and lora_B are no weight matrices of the
model. Singular values are computed in float32 (float64 for a float64 weight) on the weight's
device: alpha then agrees with the float64 one, the same xmin chosen, to a relative 1e-5 or
better below alpha = 10 and 1e-4 below 20 (the tests compare them; the difference grows with
alpha, whose tail is then narrow: a random 4864 x 896 matrix's alpha of 119 moved by 5e-4),
where float64 runs at a small fraction of float32's rate on consumer GPUs and is slower on
CPUs too. A wide matrix is decomposed as its transpose (tall), which LAPACK does several times
faster. At the shapes of Qwen2.5-0.5B, cover="layers" in float32 took 26 s of one CPU core
where every matrix in float64 took 142 s (about 0.02% of a 1000-step run on that core).
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal

import numpy as np
import powerlaw
import torch
from torch import nn

DEFAULT_MIN_DIM = 16
WELL_TRAINED = (2.0, 6.0)  # the HT-SR band of well-trained layers, both ends included

# Eigenvalues below this fraction of the largest are zero (a rank-deficient W): for a float64
# SVD, whose rounding is far below it. A float32 SVD rounds each singular value by up to about
# sqrt(N) * eps32 * s_max (N the larger side; measured: 0.4 to 0.6 of that bound), so there
# an eigenvalue s^2 / N below N * eps32^2 of the largest is noise, not spectrum (`esd`).
ZERO_EIGENVALUE = 1e-12

# powerlaw >= 2.0 bounds alpha to (0, 3) by default, which would clip every layer above 3;
# alpha > 1 is what makes an untruncated power law normalisable, and there is no upper bound.
ALPHA_RANGE = {"alpha": [1.0, None]}


Cover = Literal["layers", "all"]
COVERS = ("layers", "all")


def layer_alphas(model: nn.Module, min_dim: int = DEFAULT_MIN_DIM, *, truncated: bool = False,
                 cover: Cover = "all", dtype: torch.dtype | None = None) -> list[dict[str, Any]]:
    """alpha of every weight matrix of `model` (`weight_matrices(model, cover)`) whose
    smaller side is at least `min_dim`, singular values in `dtype` (see `esd`).

    With cover="all" embeddings and the LM head are included (they are weight matrices too);
    a tied LM head appears once, under the embedding's name. Returns one dict per matrix, in
    parameter order: `name`, `shape`, `alpha`, `xmin`, `num_eigs` (nonzero eigenvalues),
    `num_tail` (eigenvalues >= xmin), `ks_distance` (D of the fit). A matrix whose tail
    cannot be fitted gets nan in the fit's fields rather than stopping the whole model.
    """
    rows = []
    with torch.no_grad():
        for name, weight in weight_matrices(model, cover):
            if min(weight.shape) < min_dim:
                continue
            eigs = esd(weight, dtype)
            rows.append({"name": name, "shape": tuple(weight.shape), "num_eigs": len(eigs),
                         **fit_power_law(eigs, truncated=truncated)})
    return rows


def weight_matrices(model: nn.Module, cover: Cover = "all") -> Iterator[tuple[str, torch.Tensor]]:
    """(name, matrix) of each 2-D weight of `model`, in parameter order, each parameter once.

    cover="all": every 2-D parameter. cover="layers": the transformer blocks' matrices only,
    that is, all but the parameters of every nn.Embedding (token and learned position
    embeddings) and the weights of the model's input and output embeddings
    (`get_input_embeddings()`, `get_output_embeddings()` of a Hugging Face model: the LM head,
    which a tied head shares with the token embedding).

    A LoRA layer (a peft tuner layer: a module with a `base_layer` and `adapter_layer_names`)
    is one matrix under its base weight's name (`...q_proj.base_layer.weight`): the base weight
    plus `get_delta_weight` of each active adapter, unless the adapters are disabled or
    already merged into the base. Its adapters' own parameters (lora_A, lora_B, ...) are
    skipped. (DoRA's magnitude rescaling is not applied.) Matrices are made one at a time.
    """
    if cover not in COVERS:
        raise ValueError(f"cover={cover!r}: expected one of {', '.join(COVERS)}")
    tuners = {id(m.base_layer): m for m in model.modules() if _is_tuner_layer(m)}
    skip = {id(p) for m in tuners.values() for p in _adapter_parameters(m)}
    if cover == "layers":
        skip |= _embedding_parameters(model)
    for prefix, module in model.named_modules():
        for short, param in module.named_parameters(prefix=prefix, recurse=False):
            if param.ndim != 2 or id(param) in skip:
                continue
            skip.add(id(param))  # a shared (tied) parameter counts once, where it comes first
            tuner = tuners.get(id(module))
            weight = param.detach()
            if tuner is not None and short.rsplit(".", 1)[-1] == "weight":
                weight = _with_adapters(tuner, weight)
            yield short, weight


def _is_tuner_layer(module: nn.Module) -> bool:
    # peft's BaseTunerLayer, recognised by shape so that peft is never imported here
    return hasattr(module, "base_layer") and hasattr(module, "adapter_layer_names")


def _adapter_parameters(tuner: nn.Module) -> Iterator[nn.Parameter]:
    for attr in tuner.adapter_layer_names:
        holder = getattr(tuner, attr, None)
        if isinstance(holder, nn.Module):
            yield from holder.parameters()


def _with_adapters(tuner: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """`weight` (the tuner's base weight) plus the update of each of its active adapters."""
    if (getattr(tuner, "disable_adapters", False) or getattr(tuner, "merged", False)
            or not hasattr(tuner, "get_delta_weight")):
        return weight
    present = set()
    for attr in tuner.adapter_layer_names:
        holder = getattr(tuner, attr, None)
        if isinstance(holder, nn.ModuleDict | nn.ParameterDict):
            present |= set(holder.keys())
    for adapter in getattr(tuner, "active_adapters", ()):
        if adapter in present:
            weight = weight + tuner.get_delta_weight(adapter).detach().to(weight)
    return weight


def _embedding_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters of every nn.Embedding and of the input and output embeddings'
    weights (the LM head; a LoRA-wrapped head's `weight` is its base weight)."""
    ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding)
           for p in m.parameters(recurse=False)}
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, getter)()
        except (AttributeError, NotImplementedError):  # not a Hugging Face model, or no head
            continue
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            ids.add(id(weight))
    return ids


def esd(weight: torch.Tensor, dtype: torch.dtype | None = None) -> np.ndarray:
    """Nonzero eigenvalues of W^T W / N (N the larger side), ascending, in float64.

    The singular values are computed on the weight's device in `dtype`: by default float32,
    float64 for a float64 weight (a float32, bfloat16 or float16 weight holds no more than
    float32 represents). Eigenvalues below the rounding of that SVD are left out as zero:
    below ZERO_EIGENVALUE of the largest, and for float32 below N * eps32^2 of it (singular
    values below sqrt(N) * eps32 of the largest).
    """
    if dtype is None:
        dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    matrix = weight.detach().to(dtype)
    if matrix.shape[0] < matrix.shape[1]:
        matrix = matrix.mT  # the same singular values; LAPACK is several times faster tall
    n = matrix.shape[0]
    eigs = np.sort(torch.linalg.svdvals(matrix).cpu().numpy().astype(np.float64) ** 2 / n)
    if len(eigs) == 0 or eigs[-1] <= 0:
        return eigs[:0]
    zero = max(ZERO_EIGENVALUE, n * torch.finfo(dtype).eps ** 2)
    return eigs[eigs > zero * eigs[-1]]


def fit_power_law(eigs: np.ndarray, *, truncated: bool = False) -> dict[str, float]:
    """MLE fit of p(lambda) ~ lambda^-alpha to the tail of `eigs`, xmin by the KS method.

    Returns `alpha`, `xmin`, `num_tail`, `ks_distance`; all nan when the fit is impossible
    (too few distinct eigenvalues) or no candidate xmin gives a valid alpha. The default
    (untruncated) fit is `_untruncated_fit`, powerlaw's estimator vectorised; `truncated=True`
    (xmax = the largest eigenvalue) calls powerlaw itself.
    """
    failed = {"alpha": math.nan, "xmin": math.nan, "num_tail": 0, "ks_distance": math.nan}
    if len(np.unique(eigs)) < 3:
        return failed
    if not truncated:
        fit = _untruncated_fit(eigs)
        return failed if fit is None else fit
    try:
        fit = _powerlaw_fit(eigs, xmax=float(np.max(eigs)))
    except (ValueError, ArithmeticError, IndexError, RuntimeError):
        # powerlaw fails in assorted ways on degenerate spectra; one matrix must not stop
        # the model's report
        return failed
    if fit is None:
        return failed
    return fit


# Candidate xmin are processed in blocks of at most this many (candidate, eigenvalue) pairs,
# which bounds the memory of the D computation (8 bytes each, a few arrays) for large matrices.
_BLOCK_ELEMENTS = 1 << 20


def _untruncated_fit(eigs: np.ndarray) -> dict[str, float] | None:
    """powerlaw's untruncated continuous fit (xmin by D, alpha >= ALPHA_RANGE), vectorised.

    What `powerlaw.Fit(eigs, xmin_distance="D", parameter_ranges=ALPHA_RANGE)` (powerlaw 2.0)
    computes, for every candidate xmin at once:

    * data: the positive values, sorted (powerlaw drops zeros; infinities are dropped here
      too, the ESD has none); N of them.
    * candidates: every distinct value except the two largest (powerlaw takes the distinct
      values below the maximum and drops the last of those), so each tail holds at least
      three distinct values; fewer than two candidates is a failed fit.
    * alpha: the continuous MLE 1 + n / sum(log(x / xmin)) over the n values >= xmin. powerlaw
      runs Nelder-Mead on the likelihood from this starting point when it falls outside
      (1.5, 3]; it is the likelihood's exact maximum, so the optimiser returns it unchanged.
    * validity (powerlaw's per-candidate `noise_flag`): a numerically fitted alpha within 0.01
      of the lower bound of ALPHA_RANGE (1), or below it, is flagged (this MLE is always > 1); the
      best xmin is chosen among unflagged candidates only, and none unflagged fails the fit.
    * D: max |T - E| over the distinct tail values u, T(u) = 1 - (u / xmin)^(1 - alpha) the
      fitted CDF and E(u) the fraction of the tail strictly below u (powerlaw's empirical CDF,
      the value before the step at u).
    * xmin: the valid candidate with the smallest D, the smallest such xmin on a tie.

    sum(log(x / xmin)) is accumulated from the gaps between consecutive sorted values (each
    weighted by the number of values above it), all non-negative, so it loses no precision
    to cancellation when the tail is narrow. Returns None when the fit fails.
    """
    data = np.sort(np.asarray(eigs, dtype=np.float64))
    data = data[(data > 0) & np.isfinite(data)]
    total = len(data)
    # values: distinct data; below[j]: how many data lie strictly below values[j]
    values, below = np.unique(data, return_index=True)
    num_candidates = len(values) - 2
    if num_candidates < 2:
        return None
    xmins, start = values[:num_candidates], below[:num_candidates]
    # sum over data at or above data[p] of log(x / data[p]) = sum over i > p of
    # log(data[i] / data[i - 1]) * (total - i): suffix sums of non-negative terms
    weighted_gaps = np.log(data[1:] / data[:-1]) * (total - np.arange(1, total))
    suffix = np.concatenate([np.cumsum(weighted_gaps[::-1])[::-1], [0.0]])
    num_tail = total - start
    alphas = 1.0 + num_tail / suffix[start]

    # powerlaw flags (noise_flag) a numerical fit at or within 0.01 of the lower bound
    lower = ALPHA_RANGE["alpha"][0]
    closed_form = (alphas > 1.5) & (alphas <= 3.0)  # powerlaw skips the optimiser here
    valid = closed_form | ~(alphas - 1e-2 < lower)
    if not valid.any():
        return None

    # empirical CDF of each tail at the distinct values, as powerlaw computes it: the CDF
    # of all the data, the part below xmin removed and the rest renormalised
    cdf_all = below / total
    distances = np.empty(num_candidates)
    rows = max(1, _BLOCK_ELEMENTS // len(values))
    with np.errstate(over="ignore"):  # (u / xmin)^(1 - alpha) below xmin, masked out below
        for first in range(0, num_candidates, rows):
            _block_distances(values, cdf_all, xmins, alphas, first,
                             min(first + rows, num_candidates), out=distances)

    best = int(np.argmin(np.where(valid, distances, np.inf)))
    alpha, distance = float(alphas[best]), float(distances[best])
    if not (np.isfinite(alpha) and np.isfinite(distance)):
        return None
    return {"alpha": alpha, "xmin": float(xmins[best]), "num_tail": int(num_tail[best]),
            "ks_distance": distance}


def _block_distances(values: np.ndarray, cdf_all: np.ndarray, xmins: np.ndarray,
                     alphas: np.ndarray, first: int, last: int, out: np.ndarray) -> None:
    """D of candidates first..last-1 (xmin = values[k], k in that range) into out[first:last]."""
    cols = values[first:]  # no candidate of the block has a tail below values[first]
    xmin = xmins[first:last, None]
    dropped = cdf_all[first:last, None]
    empirical = (cdf_all[None, first:] - dropped) / (1.0 - dropped)
    fitted = 1.0 - (cols[None, :] / xmin) ** (1.0 - alphas[first:last, None])
    diff = fitted - empirical
    # below its xmin a candidate's difference is no part of its D; 0 (its value at xmin) is
    diff[cols[None, :] < xmin] = 0.0
    out[first:last] = np.maximum(diff.max(axis=1), -diff.min(axis=1))


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


# what `summarize` returns
SUMMARY_KEYS = ("alpha_mean", "alpha_median", "alpha_min", "alpha_max", "share_in_2_6", "layers")


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
        return {**dict.fromkeys(SUMMARY_KEYS, nan), "layers": 0}
    low, high = WELL_TRAINED
    return {
        "alpha_mean": statistics.fmean(values),
        "alpha_median": statistics.median(values),
        "alpha_min": min(values),
        "alpha_max": max(values),
        "share_in_2_6": sum(low <= v <= high for v in values) / len(values),
        "layers": len(values),
    }
