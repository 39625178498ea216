"""The divergence penalty of DPO-Kernels: mean_t D(P_t || Q_t) over the response tokens."""

from __future__ import annotations

from torch import Tensor, nn

from raypo.losses.batch import LOGIT_FIELDS, MASK_FIELDS, PreferenceBatch
from raypo.losses.divergences import divergence
from raypo.losses.token import token_divergence, token_values

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
        # this penalty's own divergence (a mixture may hold two penalties)
        self.key = f"divergence_penalty:{id(self):x}"

    def term(self, policy_logits, ref_logits, labels, mask) -> Tensor:
        """D(P_t || Q_t) per position (a TokenTerm)."""
        return token_divergence(self.divergence, policy_logits, ref_logits, mask)

    def token_terms(self) -> dict:
        return {self.key: self.term}

    def forward(self, batch: PreferenceBatch) -> Tensor:
        d_w = token_values(batch, "chosen", self.key, self.term)
        d_l = token_values(batch, "rejected", self.key, self.term)
        n = batch.chosen_mask.sum(-1) + batch.rejected_mask.sum(-1)
        return (d_w.sum(-1) + d_l.sum(-1)) / n.clamp_min(1).to(d_w.dtype)
