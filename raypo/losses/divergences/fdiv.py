"""The generic f-divergence D_f(P || Q) = sum Q f(P / Q), with f chosen by name."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

from raypo.losses.divergences.base import LN2, Divergence, mass
from raypo.losses.registry import DIVERGENCES


# Each term is Q f(t) with t = P / Q = exp(r), r = log P - log Q, rewritten so that nothing
# overflows: the floor keeps |r| <= 46, but exp(2 r) can still exceed float32. A weight is
# masked to exactly 0 (`mass`) only where the term's limit at that zero is 0.
def _kl(logp: Tensor, logq: Tensor, r: Tensor) -> Tensor:
    return mass(logp) * r  # Q t log t = P r


def _reverse_kl(logp: Tensor, logq: Tensor, r: Tensor) -> Tensor:
    return mass(logq) * -r  # Q (-log t)


def _chi2(logp: Tensor, logq: Tensor, r: Tensor) -> Tensor:
    # Q (t - 1)^2: as written where P <= Q; where P > Q as (P^2 / Q)(1 - 1/t)^2, whose first
    # factor is exp(2 log P - log Q) <= exp(46). Each side sees only its own r, so neither
    # overflows, and both are exactly 0 at P == Q.
    below, above = r.clamp_max(0.0), r.clamp_min(0.0)
    at_or_below = mass(logq) * below.expm1().square()
    return at_or_below + (logq + 2 * above).exp() * (-above).expm1().square()


def _tv(logp: Tensor, logq: Tensor, r: Tensor) -> Tensor:
    return 0.5 * (mass(logp) - mass(logq)).abs()  # Q |t - 1| / 2


def _js(logp: Tensor, logq: Tensor, r: Tensor) -> Tensor:
    # Q f(t) = (P r - (P + Q) log((1 + t) / 2)) / 2 with log((1 + t) / 2) = softplus(r) - log 2;
    # P r - P softplus(r) = -P softplus(-r) avoids subtracting two terms of size |r| <= 46.
    p, q = mass(logp), mass(logq)
    return 0.5 * (p * (LN2 - F.softplus(-r)) + q * (LN2 - F.softplus(r)))


def _hellinger(logp: Tensor, logq: Tensor, r: Tensor) -> Tensor:
    # Q (sqrt t - 1)^2 / 2. Q is not masked: as Q -> 0 the term tends to P / 2, and the floor
    # mass of Q times t = P / Q reproduces that limit.
    return 0.5 * logq.exp() * (0.5 * r).expm1().square()


GENERATORS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "kl": _kl,
    "reverse_kl": _reverse_kl,
    "chi2": _chi2,
    "tv": _tv,
    "js": _js,
    "hellinger": _hellinger,
}


@DIVERGENCES.register("fdiv")
class FDivergence(Divergence):
    """f-divergence D_f(P || Q) = sum Q f(P / Q) (Csiszar), the generic penalty of DPO-Kernels
    (arXiv 2501.03271).

    Args:
        f: the generator, by name (default "reverse_kl", KL(Q || P): as a selection candidate
            the default must differ from the `kl` candidate, which f = "kl" would copy), with
            t = P / Q:
            - kl:         f(t) = t log t                               -> KL(P || Q)
            - reverse_kl: f(t) = -log t                                -> KL(Q || P)
            - chi2:       f(t) = (t - 1)^2                             -> sum P^2 / Q - 1
            - tv:         f(t) = |t - 1| / 2                           -> sum |P - Q| / 2
            - js:         f(t) = (t log t - (1 + t) log((1 + t)/2)) / 2 -> Jensen-Shannon
            - hellinger:  f(t) = (sqrt t - 1)^2 / 2                    -> 1 - sum sqrt(P Q)

    js and hellinger are scaled so that they equal the `js` and `hellinger` divergences.

    Formula and paper: docs/losses.md#divergence-fdiv
    """

    def __init__(self, f: str = "reverse_kl"):
        super().__init__()
        if f not in GENERATORS:
            raise ValueError(f"fdiv: unknown f {f!r}; expected one of: {', '.join(GENERATORS)}")
        self.f = f
        self._terms = GENERATORS[f]

    def from_log_probs(self, logp: Tensor, logq: Tensor) -> Tensor:
        return self._terms(logp, logq, logp - logq).sum(-1)

    def extra_repr(self) -> str:
        return f"f={self.f!r}"
