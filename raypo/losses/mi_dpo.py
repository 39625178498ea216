"""The mutual-information loss with a prior (Tutnov et al. 2025, arXiv 2501.01544)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from raypo.losses.base import PreferenceLoss, neg_logsigmoid
from raypo.losses.batch import POLICY_SEQUENCE_FIELDS, PreferenceBatch
from raypo.losses.describe import Needs
from raypo.losses.modifiers import WEIGHTING
from raypo.losses.priors import SparsePOPrior
from raypo.losses.registry import LOSSES, PRIORS


@LOSSES.register("mi_dpo")
class MutualInformationDPO(PreferenceLoss):
    """MI-DPO (arXiv 2501.01544), a = beta:
    `-log sigma(a [logp(y_w) - log zeta(y_w)] - a [logp(y_l) - log zeta(y_l)])`.

    Many DPO variants differ only in the prior zeta against which the policy's likelihood is
    measured; the prior is chosen by name (`PRIORS`: reference, simpo, rdpo, tdpo1, tdpo2,
    sparsepo, learnable) and its own parameters are passed through (e.g. `gamma` for simpo,
    `alpha` for rdpo/tdpo2). The reward logged is a [logp(y) - log zeta(y)]. Default beta 0.1,
    prior "reference" (= DPO).

    Formula and paper: docs/losses.md#loss-mi_dpo
    """

    options = WEIGHTING

    family = "mutual-information"

    def __init__(self, beta: float = 0.1, prior: str = "reference", **prior_params):
        super().__init__(beta)
        self.prior = PRIORS.create(prior, **prior_params)
        self.requires = type(self).needs(prior=prior).fields

    @classmethod
    def needs(cls, prior: str = "reference", **params) -> Needs:
        return Needs(POLICY_SEQUENCE_FIELDS | PRIORS.get_class(prior).requires)

    @classmethod
    def identity(cls, prior: str = "reference", **params) -> dict[str, Any]:
        return {**super().identity(), "prior": prior}

    def pair_losses(self, batch: PreferenceBatch, metrics: dict) -> tuple[Tensor, Tensor, Tensor]:
        zeta_w, zeta_l = self.prior(batch, self.beta)
        reward_w = self.beta * (batch.policy_chosen_logps - zeta_w)
        reward_l = self.beta * (batch.policy_rejected_logps - zeta_l)
        losses = neg_logsigmoid(reward_w - reward_l)
        if isinstance(self.prior, SparsePOPrior):
            losses = losses + self.prior.penalty
        return losses, reward_w, reward_l
