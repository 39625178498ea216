"""Divergences with a closed form on two discrete distributions (DPO-Kernels, arXiv 2501.03271).

All are computed from log-probabilities: a probability is only ever exp of a clamped log, so
zeros in P or Q give finite values and gradients. Where a textbook form would be rounding noise
at P == Q (as it is at the first step, where the policy is the reference) the code uses an
equivalent form that is exactly 0 there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from raypo.losses.divergences.base import LN2, LOG_FLOOR, Divergence, mass
from raypo.losses.registry import DIVERGENCES, check_positive


def kl_terms(logp: Tensor, logq: Tensor) -> Tensor:
    """P (log P - log Q) per bin; bins where P is 0 contribute exactly 0."""
    return mass(logp) * (logp - logq)


def root(logp: Tensor) -> Tensor:
    """sqrt P as exp(log P / 2), since sqrt has an infinite gradient at 0; floor mass counts
    as 0 (its root, 1e-10, would otherwise be visible)."""
    return torch.where(logp > LOG_FLOOR, (0.5 * logp).exp(), torch.zeros_like(logp))


def hellinger_terms(logp: Tensor, logq: Tensor) -> Tensor:
    """(sqrt P - sqrt Q)^2 / 2 per bin."""
    return 0.5 * (root(logp) - root(logq)).square()


@DIVERGENCES.register("kl")
class KL(Divergence):
    """Kullback-Leibler KL(P || Q) = sum P (log P - log Q). No parameters.

    Source: the KL penalty of DPO-Kernels (arXiv 2501.03271).

    Formula and paper: docs/losses.md#divergence-kl
    """

    def from_log_probs(self, logp: Tensor, logq: Tensor) -> Tensor:
        return kl_terms(logp, logq).sum(-1)


@DIVERGENCES.register("js")
class JS(Divergence):
    """Jensen-Shannon JS = KL(P || M)/2 + KL(Q || M)/2 with M = (P + Q)/2; 0 <= JS <= log 2.

    With r = log P - log Q: log M - log P = softplus(-r) - log 2 and log M - log Q =
    softplus(r) - log 2, the same as log M = logaddexp(log P, log Q) - log 2 but exactly 0 at
    P == Q. No parameters. Source: DPO-Kernels (arXiv 2501.03271).

    Formula and paper: docs/losses.md#divergence-js
    """

    def from_log_probs(self, logp: Tensor, logq: Tensor) -> Tensor:
        r = logp - logq
        to_m = mass(logp) * (LN2 - F.softplus(-r)) + mass(logq) * (LN2 - F.softplus(r))
        return (0.5 * to_m.sum(-1)).clamp_max(LN2)


@DIVERGENCES.register("hellinger")
class Hellinger(Divergence):
    """Squared Hellinger H^2 = 1 - sum sqrt(P Q) = 1/2 sum (sqrt P - sqrt Q)^2, in [0, 1].

    Named in DPO-Kernels (arXiv 2501.03271), absent from its code. The squared-difference
    form is used: it has no cancellation when P is close to Q and is exactly 0 at P == Q.
    No parameters.

    Formula and paper: docs/losses.md#divergence-hellinger
    """

    def from_log_probs(self, logp: Tensor, logq: Tensor) -> Tensor:
        return hellinger_terms(logp, logq).sum(-1).clamp(0.0, 1.0)


@DIVERGENCES.register("renyi")
class Renyi(Divergence):
    """Renyi divergence of order alpha: log(sum P^a Q^(1-a)) / (a - 1); alpha = 1 is KL.
    Source: DPO-Kernels (arXiv 2501.03271).

    Args:
        alpha: the order, > 0. Default 2 (log(1 + chi^2): heavier than KL where the reference
            puts little mass). The DPO-Kernels code's default, 1.01, is KL within 1% and would
            make this candidate a copy of `kl`; 0.5 is twice `bhattacharyya`.

    P^a Q^(1-a) = P exp((a-1) r) with r = log P - log Q; logsumexp(log P) (0 in exact
    arithmetic) is subtracted so that the rounding of the normaliser, which 1/(a-1) would
    amplify a hundredfold at a = 1.01, cancels and the value is exactly 0 at P == Q.

    Formula and paper: docs/losses.md#divergence-renyi
    """

    def __init__(self, alpha: float = 2.0):
        super().__init__()
        self.alpha = check_positive("renyi", "alpha", alpha)

    def from_log_probs(self, logp: Tensor, logq: Tensor) -> Tensor:
        if self.alpha == 1.0:
            return kl_terms(logp, logq).sum(-1)
        a1 = self.alpha - 1.0
        tilted = (logp + a1 * (logp - logq)).logsumexp(-1)
        return (tilted - logp.logsumexp(-1)) / a1

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


@DIVERGENCES.register("bhattacharyya")
class Bhattacharyya(Divergence):
    """Bhattacharyya distance -log sum sqrt(P Q) = -log(1 - H^2), H^2 the squared Hellinger.

    Near P == Q, -log1p(-H^2) is exact (and exactly 0 at P == Q); near disjoint supports
    1 - H^2 underflows and -logsumexp((log P + log Q) / 2) is used instead. No parameters.
    Source: DPO-Kernels (arXiv 2501.03271).

    Formula and paper: docs/losses.md#divergence-bhattacharyya
    """

    def from_log_probs(self, logp: Tensor, logq: Tensor) -> Tensor:
        h2 = hellinger_terms(logp, logq).sum(-1)
        close = -(-h2.clamp(0.0, 0.5)).log1p()
        far = -(0.5 * (logp + logq)).logsumexp(-1)
        return torch.where(h2 > 0.5, far, close)
