"""f-DPO (Wang et al. 2023, "Beyond Reverse KL", arXiv 2309.16240)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from raypo.losses.base import PreferenceLoss, neg_logsigmoid
from raypo.losses.batch import PreferenceBatch
from raypo.losses.modifiers import MODIFIERS
from raypo.losses.registry import LOSSES, check_range

# f'(u) = -u^-a grows as e^(-a h) when the log-ratio h falls, and e^88 overflows float32. Below
# h = -50 the exponential is continued by its tangent there: finite for any h (e^50 * 1e4 is far
# from float32's limit) and still increasing in h, so a chosen response whose log-ratio keeps
# falling keeps its gradient, of the right sign, where a clamp would zero it. Above, e^(-a h)
# only underflows towards 0, harmlessly.
_H_LIMIT = 50.0


def _exp_neg(h: Tensor, a: float) -> Tensor:
    """e^(-a h), continued linearly (value and slope of e^(-a h) at h = -50) below h = -50."""
    h_in = h.clamp_min(-_H_LIMIT)
    e = torch.exp(-a * h_in)
    return e - a * e * (h - h_in)


def _reverse_kl(h: Tensor, alpha: float) -> Tensor:
    return h + 1


def _forward_kl(h: Tensor, alpha: float) -> Tensor:
    return -_exp_neg(h, 1.0)


def _jensen_shannon(h: Tensor, alpha: float) -> Tensor:
    # log(2u / (1+u)) with u = e^h, written so that no e^h is ever formed.
    return math.log(2.0) + h - F.softplus(h)


def _alpha(h: Tensor, alpha: float) -> Tensor:
    return (1 - _exp_neg(h, alpha)) / alpha


_F_PRIME = {"reverse_kl": _reverse_kl, "forward_kl": _forward_kl, "js": _jensen_shannon,
            "alpha": _alpha}


@LOSSES.register("fdpo")
class FDPO(PreferenceLoss):
    """f-DPO (arXiv 2309.16240): `-log sigma(beta * (f'(u_w) - f'(u_l)))`,
    u = pi/pi_ref = exp(h) per sequence.

    Swapping DPO's reverse-KL constraint for another f-divergence changes the implicit reward
    from log u to f'(u):
    - reverse_kl: f'(u) = log u + 1 (plain DPO)
    - forward_kl: f'(u) = -1/u (mass-covering, more diverse)
    - js:         f'(u) = log(2u / (1+u))
    - alpha:      f'(u) = (1 - u^-alpha) / alpha, alpha in (0, 1) (default 0.5)
    Computed from h = log u; below h = -50 the exponentials continue linearly (finite, and the
    gradient keeps its sign). TRL 1.16 (`f_divergence_type`) writes forward KL as 1 - 1/u (the
    constant cancels in the margin) and its `f_alpha_divergence_coef` is 1 - alpha here
    (tests/losses/test_trl.py).

    Formula and paper: docs/losses.md#loss-fdpo
    """

    options = MODIFIERS

    family = "f-divergence"

    def __init__(self, beta: float = 0.1, divergence: str = "reverse_kl", alpha: float = 0.5):
        super().__init__(beta)
        if divergence not in _F_PRIME:
            raise ValueError(f"fdpo: divergence must be one of {', '.join(_F_PRIME)}, "
                             f"got {divergence!r}")
        self.divergence = divergence
        self.alpha = check_range("fdpo", "alpha", alpha, 0.0, 1.0, low_open=True, high_open=True)

    def pair_losses(self, batch: PreferenceBatch, metrics: dict) -> Tensor:
        f_prime = _F_PRIME[self.divergence]
        reward_gap = (f_prime(batch.chosen_logratios, self.alpha)
                      - f_prime(batch.rejected_logratios, self.alpha))
        return neg_logsigmoid(self.beta * reward_gap)
