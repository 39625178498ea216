"""The baseline family: DPO and the losses that change only its link function.

Each loss is a function of the log-ratio margin delta = h(y_w) - h(y_l), h = logp - ref, except
IPO (length-averaged) and the reference-free SimPO. TRL's `DPOTrainer` implements the same
formulas as `loss_type` sigmoid, ipo, hinge and robust (tests/losses/test_trl.py runs TRL's own
code on the same inputs). cDPO has no TRL counterpart since TRL 0.29: its sigmoid loss ignores
`label_smoothing` (TRL's aot losses keep the cDPO form).
"""

from __future__ import annotations

import torch
from torch import Tensor

from raypo.losses.base import PreferenceLoss, neg_logsigmoid
from raypo.losses.batch import POLICY_SEQUENCE_FIELDS, PreferenceBatch
from raypo.losses.modifiers import MODIFIERS, WEIGHTING
from raypo.losses.registry import LOSSES, check_range


@LOSSES.register("dpo")
class DPO(PreferenceLoss):
    """DPO (Rafailov et al. 2023, arXiv 2305.18290): `-log sigma(beta * delta)`.

    The policy's log-ratio against the reference is an implicit reward; the Bradley-Terry
    likelihood of the observed preference is maximised. beta (default 0.1, typical 0.01-0.5)
    is the strength of the reverse-KL constraint to the reference.

    Formula and paper: docs/losses.md#loss-dpo
    """

    options = MODIFIERS

    def pair_losses(self, batch: PreferenceBatch, metrics: dict) -> Tensor:
        return neg_logsigmoid(self.beta * batch.margin)


@LOSSES.register("ipo")
class IPO(PreferenceLoss):
    """IPO (Azar et al. 2023, arXiv 2310.12036): `(delta_bar - 1/(2 beta))^2`.

    A squared loss regresses the margin to a finite target instead of pushing it to infinity,
    so deterministic preferences cannot over-fit. delta_bar uses length-averaged log-probs
    (as TRL does). beta default 0.1.

    Formula and paper: docs/losses.md#loss-ipo
    """

    options = MODIFIERS

    def pair_losses(self, batch: PreferenceBatch, metrics: dict) -> Tensor:
        avg_margin = (batch.chosen_logratios / batch.chosen_lengths.clamp_min(1)
                      - batch.rejected_logratios / batch.rejected_lengths.clamp_min(1))
        return (avg_margin - 1 / (2 * self.beta)) ** 2


@LOSSES.register("hinge")
class Hinge(PreferenceLoss):
    """Hinge loss on the log-ratio margin: `max(0, 1 - beta * delta)`.

    With the reference in the margin this is RSO's form (Liu et al. 2023, arXiv 2309.06657,
    TRL's `hinge`); SLiC (Zhao et al. 2023, arXiv 2305.10425), where the hinge comes from, uses
    the policy's log-probs alone. beta (default 0.1) is the inverse of the margin the pair
    must clear.

    Formula and paper: docs/losses.md#loss-hinge
    """

    options = MODIFIERS

    def pair_losses(self, batch: PreferenceBatch, metrics: dict) -> Tensor:
        return torch.relu(1 - self.beta * batch.margin)


@LOSSES.register("cdpo")
class ConservativeDPO(PreferenceLoss):
    """cDPO, DPO with label smoothing (Mitchell 2023, "A note on DPO with noisy preferences"):
    `-(1-eps) log sigma(beta delta) - eps log sigma(-beta delta)`.

    Each label is taken as flipped with probability eps (default 0.1, in [0, 0.5)). Not TRL's
    `sigmoid` with `label_smoothing`: TRL >= 0.29 ignores label_smoothing there.

    Formula and paper: docs/losses.md#loss-cdpo
    """

    options = MODIFIERS

    def __init__(self, beta: float = 0.1, eps: float = 0.1):
        super().__init__(beta)
        self.eps = check_range("cdpo", "eps", eps, 0.0, 0.5, high_open=True)

    def pair_losses(self, batch: PreferenceBatch, metrics: dict) -> Tensor:
        z = self.beta * batch.margin
        return (1 - self.eps) * neg_logsigmoid(z) + self.eps * neg_logsigmoid(-z)


@LOSSES.register("robust")
class RobustDPO(PreferenceLoss):
    """rDPO (Chowdhury et al. 2024, arXiv 2403.00409):
    `[-(1-eps) log sigma(beta delta) + eps log sigma(-beta delta)] / (1 - 2 eps)`.

    An unbiased estimate of the clean-label DPO loss when labels flip with rate eps (default
    0.1, in [0, 0.5)).

    Formula and paper: docs/losses.md#loss-robust
    """

    options = MODIFIERS

    def __init__(self, beta: float = 0.1, eps: float = 0.1):
        super().__init__(beta)
        self.eps = check_range("robust", "eps", eps, 0.0, 0.5, high_open=True)

    def pair_losses(self, batch: PreferenceBatch, metrics: dict) -> Tensor:
        z = self.beta * batch.margin
        return ((1 - self.eps) * neg_logsigmoid(z) - self.eps * neg_logsigmoid(-z)) / (
            1 - 2 * self.eps
        )


@LOSSES.register("simpo")
class SimPO(PreferenceLoss):
    """SimPO (Meng et al. 2024, arXiv 2405.14734), reference-free:
    `-log sigma(beta (logp(y_w)/|y_w| - logp(y_l)/|y_l|) - gamma)`.

    The length-averaged log-prob is the reward, and gamma is a target margin. Defaults
    beta 2.0, gamma 1.0 (the paper's gamma/beta ranges over 0.25-0.8).

    Formula and paper: docs/losses.md#loss-simpo
    """

    options = WEIGHTING

    requires = POLICY_SEQUENCE_FIELDS
    reference_free = True

    def __init__(self, beta: float = 2.0, gamma: float = 1.0):
        super().__init__(beta)
        self.gamma = float(gamma)

    def pair_losses(self, batch: PreferenceBatch, metrics: dict) -> Tensor:
        avg_w = batch.policy_chosen_logps / batch.chosen_lengths.clamp_min(1)
        avg_l = batch.policy_rejected_logps / batch.rejected_lengths.clamp_min(1)
        return neg_logsigmoid(self.beta * (avg_w - avg_l) - self.gamma)


@LOSSES.register("rdpo")
class LengthRegularizedDPO(PreferenceLoss):
    """R-DPO (Park et al. 2024, arXiv 2403.19159):
    `-log sigma(beta delta + alpha (|y_w| - |y_l|))`.

    The paper maximises E[r(x, y)] - alpha |y| under DPO's KL constraint, so the reward the
    policy carries is r - alpha |y|: a longer chosen response needs less margin, a longer
    rejected one more, and the policy gains nothing by exploiting a verbosity bias of the data.
    alpha default 0.01 (the paper sweeps 0.005-0.05).

    Formula and paper: docs/losses.md#loss-rdpo
    """

    options = MODIFIERS

    def __init__(self, beta: float = 0.1, alpha: float = 0.01):
        super().__init__(beta)
        self.alpha = float(alpha)

    def pair_losses(self, batch: PreferenceBatch, metrics: dict) -> Tensor:
        length_gap = (batch.chosen_lengths - batch.rejected_lengths).to(batch.margin.dtype)
        return neg_logsigmoid(self.beta * batch.margin + self.alpha * length_gap)
