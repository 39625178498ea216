"""Selection metrics computed before any training, from the data and the reference model alone.

In the spirit of DPO-Kernels (Das et al. 2025, arXiv 2501.03271), which chooses a
kernel-divergence pair from statistics of the data; the paper's formulas are not public, so
these are the project's own, each with its formula and intent below. Everything here is a pure
function of tensors (no model, no dataset loading: see raypo.search.evidence for that).

Kernel side, on N triplets of embeddings (e_x prompt, e_w chosen, e_l rejected), with
m_i = log K(e_x_i, e_w_i) - log K(e_x_i, e_l_i) computed by the real kernel implementation
(the semantic term of the hybrid loss at step 0, where policy == reference):
    margin_mean = mean_i m_i
    margin_std  = std_i m_i                 (population std)
    accuracy    = mean_i [1(m_i > 0) + 1(m_i == 0) / 2]
    snr         = margin_mean / margin_std   (+-inf or 0 when margin_std == 0)

Divergence side, on the reference's response tokens: its top-k next-token distributions
(`TopKLogits`) and its per-token log-probs of the chosen and rejected responses:
    coverage    = mean_t sum_{j <= k} p_t,j          (mass the top-k support holds)
    entropy     = mean_t H_t / log V, H_t = -sum_{j<=k} p_tj log p_tj - r_t log(r_t / (V - k))
    kurtosis    = E[(d - mu)^4] / sigma^4            (Pearson; 3 for a Gaussian)
    tail_mass   = P(|d - median| > 3 * 1.4826 * MAD) (0.0027 for a Gaussian, 0.046 Laplace)
    drift       = JS(mean_t P_t^w, mean_t P_t^l) / log 2   in [0, 1]
    strength    = mean_{t, T} D(softmax(log Q_t / T) || Q_t), T in {0.8, 1.25} (per divergence)
where d are the position-aligned chosen-minus-rejected per-token log-probs (see
`aligned_logratios`) and r_t = 1 - sum_j p_tj the mass outside the top k.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from raypo.losses import (
    DIVERGENCES,
    KERNELS,
    TopKLogits,
    divergence_candidates,
    kernel_candidates,
)
from raypo.losses.divergences.closed_form import JS as JensenShannon

# 1.4826 * MAD estimates a Gaussian's standard deviation (1 / Phi^-1(3/4)).
MAD_TO_SIGMA = 1.4826


# ----------------------------------------------------------------------------- moments


def kurtosis(x: Tensor) -> float:
    """Pearson kurtosis `E[(x - mu)^4] / sigma^4` (population moments, float64): 3 for a
    Gaussian, 6 for a Laplace, 9 for a Student-t with 5 degrees of freedom, 1.8 for a uniform.

    Intent: how much of the sample's spread comes from rare extreme values. NaN for fewer
    than 2 values or zero variance (no spread, no tails to speak of).
    """
    x = x.detach().double().flatten()
    if x.numel() < 2:
        return math.nan
    centred = x - x.mean()
    var = centred.pow(2).mean()
    if var <= 0:
        return math.nan
    return float(centred.pow(4).mean() / var.pow(2))


def tail_mass(x: Tensor, z: float = 3.0) -> float:
    """`P(|x - median| > z * 1.4826 * MAD)`, MAD = median |x - median|: the share of values
    beyond z robust standard deviations (z = 3: 0.0027 for a Gaussian, exp(-3 * 1.4826 * ln 2)
    = 0.046 for a Laplace).

    Intent: the robust twin of the kurtosis. A handful of outliers dominates the fourth
    moment; this counts them instead, and the median and MAD are not moved by them. NaN for an
    empty sample or MAD = 0 (more than half the values equal).
    """
    x = x.detach().double().flatten()
    if x.numel() == 0:
        return math.nan
    med = x.median()
    mad = (x - med).abs().median()
    if mad <= 0:
        return math.nan
    return float(((x - med).abs() > z * MAD_TO_SIGMA * mad).double().mean())


# ----------------------------------------------------------------------------- kernels


def kernel_margins(kernel, prompt: Tensor, chosen: Tensor, rejected: Tensor) -> Tensor:
    """m_i = log K(e_x_i, e_w_i) - log K(e_x_i, e_l_i), (N,), for a raypo kernel (already
    fitted where it is data-dependent): the semantic margin the hybrid loss of kernel_dpo adds,
    before gamma."""
    with torch.no_grad():
        return kernel(prompt, chosen) - kernel(prompt, rejected)


def margin_metrics(margins: Tensor) -> dict[str, float]:
    """`margin_mean`, `margin_std`, `accuracy`, `snr` of a (N,) margin tensor (module docstring).

    Intent: `accuracy` is the share of triplets the kernel already orders the right way (ties
    count half: a kernel that cannot tell the responses apart scores 0.5); `snr` says how
    consistently, in units of the margins' own spread, so it is comparable between kernels
    whose log K live on different scales (RBF's -|a-b|^2/2 against the polynomial's
    2 log|a.b + 1|); accuracy is scale-free too.
    """
    m = margins.detach().double().flatten()
    if m.numel() == 0:
        nan = math.nan
        return {"margin_mean": nan, "margin_std": nan, "accuracy": nan, "snr": nan}
    mean, std = m.mean(), m.std(correction=0)
    accuracy = ((m > 0).double() + 0.5 * (m == 0).double()).mean()
    # every margin equal (std 0): perfectly consistent in the margins' own direction, or 0
    # when they are all 0 (sign(0) * inf would be nan)
    snr = mean / std if std > 0 else (torch.sign(mean) * math.inf if mean != 0 else mean)
    return {"margin_mean": float(mean), "margin_std": float(std), "accuracy": float(accuracy),
            "snr": float(snr)}


def kernel_metrics(prompt: Tensor, chosen: Tensor, rejected: Tensor,
                   names: tuple[str, ...] | None = None,
                   params: dict[str, dict] | None = None) -> dict[str, dict[str, float]]:
    """`margin_metrics` of each kernel in `names` (default: the registry's candidates; built
    with `KERNELS.create(name, **params[name])`, default parameters otherwise) on the triplets
    (prompt, chosen, rejected), each (N, d).

    Data-dependent kernels are fitted first on the responses' embeddings, chosen and rejected
    stacked, as the trainer does (raypo.train.setup._fit_kernel), so each kernel is judged as
    it would start training.
    """
    if not (prompt.dim() == 2 and prompt.shape == chosen.shape == rejected.shape):
        raise ValueError(f"kernel_metrics: expected three (N, d) tensors of one shape, got "
                         f"{tuple(prompt.shape)}, {tuple(chosen.shape)}, {tuple(rejected.shape)}")
    params = params or {}
    responses = torch.cat([chosen, rejected])
    out = {}
    for name in names or kernel_candidates():
        kernel = KERNELS.create(name, **params.get(name, {}))
        kernel.fit(responses)
        out[name] = margin_metrics(kernel_margins(kernel, prompt, chosen, rejected))
    return out


# ----------------------------------------------------------------------------- distributions


def _log_probs(topk: TopKLogits) -> Tensor:
    """(..., k) exact log-probabilities of the kept tokens, float64."""
    return (topk.values - topk.log_normalizer.unsqueeze(-1)).double()


def topk_coverage(topk: TopKLogits, k: int | None = None) -> Tensor:
    """c_t = sum over the (first k, by probability) kept tokens of p_t,j, per position.

    Intent: a divergence computed on a truncated support (the reference cache keeps top-k; the
    Wasserstein penalty transports only the top 8 plus a rest point) is faithful only when that
    support holds most of the mass: with coverage c the unseen 1 - c is lumped into one bin.
    """
    logp = _log_probs(topk)
    if k is not None:
        logp = logp.sort(-1, descending=True).values[..., :k]
    return logp.exp().sum(-1).clamp(0.0, 1.0)


def topk_entropy(topk: TopKLogits, vocab_size: int) -> Tensor:
    """Normalised entropy per position, in [0, 1]:
    `H_t / log V`, `H_t = -sum_j p_tj log p_tj - r_t log(r_t / (V - k))`, r_t = 1 - sum_j p_tj.

    The rest mass r_t is spread evenly over the V - k unseen tokens: the largest entropy the
    cache allows, exact when k = V (then r_t = 0). Intent: a peaked reference (low entropy)
    puts almost no mass on most tokens, where log P/Q of an unbounded divergence (KL, Renyi)
    explodes as soon as the policy moves mass there.
    """
    if vocab_size < 2:
        raise ValueError(f"topk_entropy: vocab_size must be >= 2, got {vocab_size}")
    logp = _log_probs(topk)
    p = logp.exp()
    kept = -(p * logp).nan_to_num(0.0).sum(-1)  # 0 log 0 = 0 for -inf log-probs
    rest = (1.0 - p.sum(-1)).clamp_min(0.0)
    unseen = vocab_size - logp.shape[-1]
    if unseen > 0:
        rest_term = torch.where(rest > 0, -rest * (rest / unseen).clamp_min(1e-300).log(),
                                torch.zeros_like(rest))
    else:
        rest_term = torch.zeros_like(rest)
    return ((kept + rest_term) / math.log(vocab_size)).clamp(0.0, 1.0)


def mean_distribution(topk: TopKLogits, vocab_size: int) -> Tensor:
    """(V + 1,) the average over positions of the top-k distributions, each scattered onto the
    vocabulary, the mass outside its top k in a last "rest" bin; sums to 1."""
    p = _log_probs(topk).exp().reshape(-1, topk.values.shape[-1])
    idx = topk.indices.reshape(-1, topk.values.shape[-1]).long()
    if p.shape[0] == 0:
        raise ValueError("mean_distribution: no positions")
    total = torch.zeros(vocab_size + 1, dtype=torch.float64)
    total.scatter_add_(0, idx.flatten(), p.flatten())
    total[vocab_size] = (1.0 - p.sum(-1)).clamp_min(0.0).sum()
    return total / total.sum()


def distribution_drift(chosen: TopKLogits, rejected: TopKLogits, vocab_size: int) -> float:
    """`JS(Pbar_w, Pbar_l) / log 2` in [0, 1], Pbar the `mean_distribution` of the reference's
    next-token distributions over the chosen (resp. rejected) response positions; JS is the
    project's own Jensen-Shannon divergence (raypo.losses, "js").

    Intent: how far apart, as token distributions, the responses the data prefers and those
    it rejects lie: 0 when they are the same, 1 when their supports are disjoint. Large drift
    means the policy must move much mass per token, which an unbounded divergence penalises
    without limit and a transport cost (Wasserstein) measures by how far the mass moves. The
    rest bins of both sides are one bin, so this is a lower bound (data processing).
    """
    p, q = mean_distribution(chosen, vocab_size), mean_distribution(rejected, vocab_size)
    js = JensenShannon()(p.clamp_min(1e-300).log(), q.clamp_min(1e-300).log())
    return float((js / math.log(2.0)).clamp(0.0, 1.0))


def aligned_logratios(chosen_token_logps: Tensor, chosen_lengths: Tensor,
                      rejected_token_logps: Tensor, rejected_lengths: Tensor) -> Tensor:
    """d = log pi_ref(y_w,t | x, y_w,<t) - log pi_ref(y_l,t | x, y_l,<t) for t < min(|y_w|,
    |y_l|), every pair, flattened. Inputs are flat per-token log-probs (the responses one after
    the other, as `ReferenceOutputs.token_logps`) and (N,) lengths.

    Intent: the per-token changes DPO has to make to separate the two responses. Its tails
    say whether a few tokens carry extreme log-ratios: a token-level penalty that is unbounded
    (KL, Renyi) is then dominated by those tokens, a bounded one (JS, Hellinger) is not.
    """
    if int(chosen_lengths.sum()) != chosen_token_logps.numel() or int(
            rejected_lengths.sum()) != rejected_token_logps.numel():
        raise ValueError("aligned_logratios: the lengths do not add up to the token counts")
    w_off = torch.cumsum(chosen_lengths, 0) - chosen_lengths
    l_off = torch.cumsum(rejected_lengths, 0) - rejected_lengths
    n = torch.minimum(chosen_lengths, rejected_lengths)
    pair = torch.repeat_interleave(torch.arange(len(n)), n)
    pos = torch.arange(int(n.sum())) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
    return (chosen_token_logps.double()[w_off[pair] + pos]
            - rejected_token_logps.double()[l_off[pair] + pos])


def _topk_cat(a: TopKLogits, b: TopKLogits) -> TopKLogits:
    return TopKLogits(torch.cat([a.values, b.values]), torch.cat([a.indices, b.indices]),
                      torch.cat([a.log_normalizer, b.log_normalizer]))


def penalty_strength(name: str, topk: TopKLogits, temperatures=(0.8, 1.25),
                     max_positions: int = 4096) -> float:
    """mean over positions and temperatures T of D(P_T || Q), Q the reference's next-token
    distribution on its k kept tokens plus a rest bin, P_T = softmax(log Q / T) the same
    distribution made more (T < 1) or less (T > 1) confident: how hard divergence `name`
    (built with its defaults) pushes back on the kind of change preference training makes to
    a token distribution, on this data's distributions.

    Intent: the penalty enters the loss as alpha_div * D; at the same alpha_div a divergence
    that grows fast with a confidence shift (the KL family where the reference is peaked)
    holds the policy near the reference, a bounded one barely. Computed with the registry's
    own divergence on at most `max_positions` positions (the first ones, deterministic)."""
    logq = _log_probs(topk).reshape(-1, topk.values.shape[-1])[:max_positions]
    rest = torch.log1p(-logq.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-12))
    bins = torch.cat([logq, rest], dim=-1).clamp_min(-46.0)
    bins = bins - bins.logsumexp(-1, keepdim=True)
    div = DIVERGENCES.create(name)
    with torch.no_grad():
        values = [div(bins / t, bins).double().mean() for t in temperatures]
    return float(torch.stack(values).mean())


def divergence_metrics(*, chosen_token_logps: Tensor, chosen_lengths: Tensor,
                       rejected_token_logps: Tensor, rejected_lengths: Tensor,
                       chosen_topk: TopKLogits, rejected_topk: TopKLogits, vocab_size: int,
                       names: tuple[str, ...] | None = None,
                       ) -> dict[str, dict[str, float]]:
    """Per divergence in `names` (default: the registry's candidates): `coverage`, `entropy`,
    `kurtosis`, `tail_mass`, `drift` (the module docstring). All but `coverage` are properties
    of the data, the same for every divergence; `coverage` is that of the support the
    divergence is computed on: the top `support_k()` tokens where the divergence truncates the
    support itself (the Wasserstein penalty's default k, 8), the whole cache otherwise.

    The top-k caches are flat over response tokens ((n_tokens, k), as in `ReferenceOutputs`).
    """
    both = _topk_cat(chosen_topk, rejected_topk)
    d = aligned_logratios(chosen_token_logps, chosen_lengths, rejected_token_logps,
                          rejected_lengths)
    shared = {
        "entropy": float(topk_entropy(both, vocab_size).mean()),
        "kurtosis": kurtosis(d),
        "tail_mass": tail_mass(d),
        "drift": distribution_drift(chosen_topk, rejected_topk, vocab_size),
    }
    out = {}
    for name in names or divergence_candidates():
        k = DIVERGENCES.get_class(name).support_k()
        out[name] = {"coverage": float(topk_coverage(both, k).mean()), **shared,
                     "strength": penalty_strength(name, both)}
    return out
