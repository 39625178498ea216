"""The protocol every token-level divergence follows, and the support the pair is compared on.

A divergence D(P || Q) compares the policy's next-token distribution P with the reference's Q at
each position (DPO-Kernels, arXiv 2501.03271, adds `alpha_div * mean_t D(P_t || Q_t)` to the
loss). Each side is either full logits (..., V) or a `TopKLogits` cache of the reference.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from raypo.losses.batch import Logits, TopKLogits

# Log-probabilities are clamped below at log(1e-20) so that exact zeros in P or Q (logits of
# -inf) give finite values and finite gradients (log 0 = -inf, and 0 * inf = nan in backward),
# and so that every log-ratio lies in [-46, 46]: exp(2 * 46) would overflow float32 in chi2.
# A probability below 1e-20 changes no divergence here by more than float32 rounding.
LOG_FLOOR = math.log(1e-20)
LN2 = math.log(2.0)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012).

    Each branch only sees the inputs it is accurate on, so the branch `torch.where` discards
    cannot produce an inf whose zero-weighted gradient would turn into nan.
    """
    near_zero = torch.log(-torch.expm1(x.clamp(-LN2, -math.exp(LOG_FLOOR))))
    far = torch.log1p(-torch.exp(x.clamp_max(-LN2)))
    return torch.where(x > -LN2, near_zero, far)


def mass(logp: Tensor) -> Tensor:
    """exp(logp), with mass at the floor counted as exactly 0 (the convention 0 log 0 = 0)."""
    return torch.where(logp > LOG_FLOOR, logp.exp(), torch.zeros_like(logp))


def check_pair(p: Logits, q: Logits) -> None:
    """Raise a ValueError unless the pair can be compared (see `common_support`)."""
    p_topk, q_topk = isinstance(p, TopKLogits), isinstance(q, TopKLogits)
    if p_topk and q_topk:
        raise ValueError(
            "divergence: at least one side must be full logits (..., V); got TopKLogits for "
            "both P and Q, whose mass outside their kept tokens cannot be compared"
        )
    for side, x in (("P", p), ("Q", q)):
        if isinstance(x, TopKLogits) and (
            x.indices.shape != x.values.shape or x.log_normalizer.shape != x.values.shape[:-1]
        ):
            raise ValueError(
                f"divergence: TopKLogits for {side} has values {tuple(x.values.shape)}, indices "
                f"{tuple(x.indices.shape)}, log_normalizer {tuple(x.log_normalizer.shape)}; "
                "expected (..., k), (..., k), (...)"
            )
    # With a top-k side only the positions must agree: k need not equal V.
    same = p.shape[:-1] == q.shape[:-1] if p_topk or q_topk else p.shape == q.shape
    if not same:
        raise ValueError(
            f"divergence: P logits of shape {tuple(p.shape)} and Q logits of shape "
            f"{tuple(q.shape)} do not match"
        )


def _kept_and_rest(kept: Tensor) -> Tensor:
    """Append the bin holding 1 - sum(exp(kept)): the mass outside the kept tokens."""
    rest = log1mexp(kept.logsumexp(-1, keepdim=True)).clamp_min(LOG_FLOOR)
    return torch.cat([kept, rest], dim=-1)


def common_support(p: Logits, q: Logits) -> tuple[Tensor, Tensor]:
    """Normalised log-probabilities of P and Q on one support, clamped at `LOG_FLOOR`.

    - full, full: the whole vocabulary (`log_softmax`).
    - full, top-k (either order): k + 1 bins, the top-k side's kept tokens and one "rest" bin
      with the remaining mass of each side. This coarse-graining is exact on the kept tokens
      and, by the data-processing inequality, gives a lower bound of the full divergence.
    - top-k, top-k: ValueError.
    """
    check_pair(p, q)
    if not isinstance(p, TopKLogits) and not isinstance(q, TopKLogits):
        return p.log_softmax(-1).clamp_min(LOG_FLOOR), q.log_softmax(-1).clamp_min(LOG_FLOOR)
    topk, full = (p, q) if isinstance(p, TopKLogits) else (q, p)
    kept_topk = topk.values - topk.log_normalizer.unsqueeze(-1)
    # log_softmax then gather, not gather - logsumexp: torch fuses log_softmax's forward and
    # backward, and the logsumexp route costs 1.7x as much (measured on CPU, V = 32000).
    kept_full = full.log_softmax(-1).gather(-1, topk.indices)
    topk_bins = _kept_and_rest(kept_topk.clamp_min(LOG_FLOOR))
    full_bins = _kept_and_rest(kept_full.clamp_min(LOG_FLOOR))
    return (topk_bins, full_bins) if topk is p else (full_bins, topk_bins)


class Divergence(nn.Module):
    """D(P || Q) per position, with P = softmax(p_logits) and Q = softmax(q_logits).

    `forward(p_logits, q_logits)` returns a tensor of shape `logits.shape[:-1]`. A subclass
    writes `from_log_probs(logp, logq)`, which reduces the last dimension of two normalised,
    floor-clamped log-probability tensors; the support rules are in `common_support`. With a
    `TopKLogits` side the value is a lower bound of the full divergence (data processing).
    Every divergence here is >= 0 in exact arithmetic; the result is clamped at 0 because float32
    rounding of the normalisers can leave a near-zero value slightly negative.
    Source: the token-level divergence penalty of DPO-Kernels (arXiv 2501.03271).
    """

    name: str = "?"
    # Whether the selection rule ranks this divergence as a candidate of the kernel-divergence
    # search (raypo.losses.divergence_candidates; as a kernel's `candidate`). The rule reads
    # only measured metrics of a candidate (raypo.selection.metrics), nothing hand-set here.
    candidate: ClassVar[bool] = True

    @classmethod
    def support_k(cls, **params) -> int | None:
        """The number of top tokens per side the value is computed on, when it truncates the
        support itself (None: the whole support it is given)."""
        return None

    def forward(self, p_logits: Logits, q_logits: Logits) -> Tensor:
        logp, logq = common_support(p_logits, q_logits)
        return self.from_log_probs(logp, logq).clamp_min(0.0)

    def from_log_probs(self, logp: Tensor, logq: Tensor) -> Tensor:
        raise NotImplementedError
