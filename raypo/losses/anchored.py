"""Anchored losses: each response's own implicit reward h = logp - ref is pushed towards a
target, not only the margin between them, so the absolute likelihoods move in a chosen
direction (DPO lets both fall as long as the gap grows). TRL 1.16's `loss_type` nca_pair,
bco_pair, apo_zero, apo_down and sppo_hard (tests/losses/test_trl.py runs TRL's code).
"""

from __future__ import annotations

import torch
from torch import Tensor

from raypo.losses.base import PreferenceLoss, neg_logsigmoid
from raypo.losses.batch import PreferenceBatch
from raypo.losses.modifiers import MODIFIERS
from raypo.losses.registry import LOSSES


class AnchoredLoss(PreferenceLoss):
    """The family's shared part: a report row groups these as `anchored`; all take WPO and
    LD-DPO."""

    family = "anchored"
    options = MODIFIERS


@LOSSES.register("nca_pair")
class NCAPair(AnchoredLoss):
    """NCA, pairwise (Chen et al. 2024, "Noise Contrastive Alignment of Language Models with
    Explicit Rewards", arXiv 2402.05369):
    `-log sigma(beta h_w) - 0.5 log sigma(-beta h_w) - 0.5 log sigma(-beta h_l)`.

    Noise-contrastive estimation of each response's absolute reward rather than of the margin:
    the chosen likelihood is kept from falling, the failure mode of DPO on reasoning data.
    beta default 0.1.

    Formula and paper: docs/losses.md#loss-nca_pair
    """

    def pair_losses(self, batch: PreferenceBatch, metrics: dict) -> Tensor:
        r_w, r_l = self.beta * batch.chosen_logratios, self.beta * batch.rejected_logratios
        return neg_logsigmoid(r_w) + 0.5 * neg_logsigmoid(-r_w) + 0.5 * neg_logsigmoid(-r_l)


@LOSSES.register("bco_pair")
class BCOPair(AnchoredLoss):
    """BCO, pairwise (Jung et al. 2024, "Binary Classifier Optimization for Large Language
    Model Alignment", arXiv 2404.04656): `-log sigma(beta h_w) - log sigma(-beta h_l)`.

    A binary classifier whose logit is the implicit reward: chosen responses are labelled 1,
    rejected 0. TRL <= 0.26 also subtracted a running mean of the rewards (the paper's
    delta_0); TRL 1.16 and raypo do not. beta default 0.1.

    Formula and paper: docs/losses.md#loss-bco_pair
    """

    def pair_losses(self, batch: PreferenceBatch, metrics: dict) -> Tensor:
        r_w, r_l = self.beta * batch.chosen_logratios, self.beta * batch.rejected_logratios
        return neg_logsigmoid(r_w) + neg_logsigmoid(-r_l)


@LOSSES.register("apo_zero")
class APOZero(AnchoredLoss):
    """APO-zero (D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive
    Revisions", arXiv 2408.06266, Eq. 7): `(1 - sigma(beta h_w)) + sigma(beta h_l)`.

    For data whose chosen responses are better than the model's own: raise the chosen
    likelihood, lower the rejected. beta default 0.1.

    Formula and paper: docs/losses.md#loss-apo_zero
    """

    def pair_losses(self, batch: PreferenceBatch, metrics: dict) -> Tensor:
        return (1 - torch.sigmoid(self.beta * batch.chosen_logratios)
                + torch.sigmoid(self.beta * batch.rejected_logratios))


@LOSSES.register("apo_down")
class APODown(AnchoredLoss):
    """APO-down (D'Oosterlinck et al. 2024, arXiv 2408.06266, Eq. 8):
    `sigma(beta h_w) + (1 - sigma(beta delta))`.

    For data whose chosen responses are worse than the model's own: lower both likelihoods,
    the rejected one more. beta default 0.1.

    Formula and paper: docs/losses.md#loss-apo_down
    """

    def pair_losses(self, batch: PreferenceBatch, metrics: dict) -> Tensor:
        return (torch.sigmoid(self.beta * batch.chosen_logratios)
                + 1 - torch.sigmoid(self.beta * batch.margin))


@LOSSES.register("sppo_hard")
class SPPOHard(AnchoredLoss):
    """SPPO with hard labels (Wu et al. 2024, "Self-Play Preference Optimization for Language
    Model Alignment", arXiv 2405.00675, Eq. 4.7 with P(y_w > y_l) = 1):
    `(h_w - 1/(2 beta))^2 + (h_l + 1/(2 beta))^2`.

    Each log-ratio is regressed to the game's value: +1/(2 beta) for the winner, -1/(2 beta)
    for the loser (the paper estimates soft win probabilities with a preference model; the hard
    version, as in TRL, sets them to 1 and 0). beta default 0.1.

    Formula and paper: docs/losses.md#loss-sppo_hard
    """

    def pair_losses(self, batch: PreferenceBatch, metrics: dict) -> Tensor:
        target = 0.5 / self.beta
        return (batch.chosen_logratios - target) ** 2 + (batch.rejected_logratios + target) ** 2
