"""The divergence penalty of DPO-Kernels: mean_t D(P_t || Q_t) over the response tokens."""

from __future__ import annotations

from torch import Tensor, nn

from raypo.losses.batch import LOGIT_FIELDS, MASK_FIELDS, PreferenceBatch
from raypo.losses.divergences import divergence
from raypo.losses.token import token_divergence

PENALTY_FIELDS = LOGIT_FIELDS | MASK_FIELDS


class DivergencePenalty(nn.Module):
    """Per pair: the mean of D(P_t || Q_t) over the tokens of both responses, P the policy's and
    Q the reference's next-token distribution.

    The paper's code used only the last position; averaging every response position is the
    project's reading (the penalty then constrains the whole response, not one token).
    """

    def __init__(self, name: str, **params):
        super().__init__()
        self.divergence = divergence(name, **params)

    def forward(self, batch: PreferenceBatch) -> Tensor:
        d_w = token_divergence(self.divergence, batch.policy_chosen_logits,
                               batch.ref_chosen_logits, batch.chosen_mask)
        d_l = token_divergence(self.divergence, batch.policy_rejected_logits,
                               batch.ref_rejected_logits, batch.rejected_mask)
        n = batch.chosen_mask.sum(-1) + batch.rejected_mask.sum(-1)
        return (d_w.sum(-1) + d_l.sum(-1)) / n.clamp_min(1).to(d_w.dtype)
