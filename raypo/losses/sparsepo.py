"""SparsePO (Christopoulou et al. 2024, arXiv 2410.05102): DPO with learned sparse token masks."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from raypo.losses.base import PreferenceLoss, masked_mean, masked_sum, neg_logsigmoid
from raypo.losses.batch import PreferenceBatch
from raypo.losses.modifiers import WEIGHTING
from raypo.losses.registry import LOSSES, check_positive
from raypo.losses.tdpo import SEQ_KL_FIELDS, ReadsReferenceKL
from raypo.losses.token import REFERENCE_KL, reference_kl, token_values

SPARSEPO_FIELDS = SEQ_KL_FIELDS | {
    "policy_chosen_token_logps", "policy_rejected_token_logps",
    "ref_chosen_token_logps", "ref_rejected_token_logps",
    "ref_chosen_hidden", "ref_rejected_hidden",
}


class TokenMaskHead(nn.Module):
    """m_u(t), m_d(t) = ReLU(W h_t + b) from the reference's hidden state h_t.

    W starts at 0 and b at 1, so every token starts fully weighted (SparsePO starts as TDPO1)
    and sparsity is learned. `hidden_size=None` defers creating W until the first batch; build
    the optimizer after one forward (or pass hidden_size) so that W is in it.
    """

    def __init__(self, hidden_size: int | None = None):
        super().__init__()
        self.proj = nn.Linear(hidden_size, 2) if hidden_size else nn.LazyLinear(2)
        if hidden_size:
            self._init()

    def on_bind(self, facts) -> None:
        """Create W at the model's hidden size, so it is in the optimizer from the start."""
        if isinstance(self.proj, nn.LazyLinear) and self.proj.has_uninitialized_params():
            self.proj = nn.Linear(facts.hidden_size, 2)
            self._init()

    def _init(self) -> None:
        nn.init.zeros_(self.proj.weight)
        nn.init.ones_(self.proj.bias)

    def forward(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        if isinstance(self.proj, nn.LazyLinear) and self.proj.has_uninitialized_params():
            # materialise (in the default dtype), then set the documented initial values
            self.proj(hidden[:1, :1].to(torch.get_default_dtype()))
            with torch.no_grad():
                self._init()
        masks = torch.relu(self.proj(hidden.to(self.proj.weight.dtype)))
        return masks[..., 0], masks[..., 1]


def sparse_token_terms(head: TokenMaskHead, token_logps: Tensor, ref_token_logps: Tensor,
                       kl_t: Tensor, hidden: Tensor, mask: Tensor
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """For one response: sum_t m_u (logp_t - ref_t), sum_t m_d KL_t(Q_t||P_t), and the mean
    mask mass sum(m_u + m_d) / |y| (for the L1 penalty)."""
    m_u, m_d = head(hidden)
    weighted_ratio = masked_sum(m_u * (token_logps - ref_token_logps), mask)
    weighted_kl = masked_sum(m_d * kl_t, mask)
    return weighted_ratio, weighted_kl, masked_mean(m_u + m_d, mask)


def sparse_terms(head: TokenMaskHead, batch: PreferenceBatch):
    """sparse_token_terms of the chosen and of the rejected response; the per-token KL is a
    token term (`reference_kl`), computed in chunks by the trainer."""
    return tuple(
        sparse_token_terms(head, getattr(batch, f"policy_{side}_token_logps"),
                           getattr(batch, f"ref_{side}_token_logps"),
                           token_values(batch, side, REFERENCE_KL, reference_kl),
                           getattr(batch, f"ref_{side}_hidden"), getattr(batch, f"{side}_mask"))
        for side in ("chosen", "rejected"))


@LOSSES.register("sparsepo")
class SparsePO(ReadsReferenceKL, PreferenceLoss):
    """SparsePO (arXiv 2410.05102): `-log sigma(u - d) + lambda * mean_t (m_u + m_d)`, with
    u = beta [sum_t m_u (logp_t - ref_t)]_w - beta [...]_l and
    d = beta [sum_t m_d KL_t(Q_t||P_t)]_l - beta [...]_w.

    Learned, non-negative token masks (ReLU of a linear head on the reference's hidden states)
    decide which tokens' rewards and KL terms count, so only the tokens that carry the
    preference move. The L1 penalty (lambda default 1e-3) keeps the masks sparse. Separate
    reward and KL masks (the paper's non-shared variant). Default beta 0.1.

    Formula and paper: docs/losses.md#loss-sparsepo
    """

    options = WEIGHTING

    family = "token-level"
    requires = SPARSEPO_FIELDS

    def __init__(self, beta: float = 0.1, l1: float = 1e-3, hidden_size: int | None = None):
        super().__init__(beta)
        self.l1 = check_positive("sparsepo", "l1", l1) if l1 else 0.0
        self.head = TokenMaskHead(hidden_size)

    def pair_losses(self, batch: PreferenceBatch, metrics: dict):
        (ratio_w, kl_w, mass_w), (ratio_l, kl_l, mass_l) = sparse_terms(self.head, batch)
        u = self.beta * (ratio_w - ratio_l)
        d = self.beta * (kl_l - kl_w)
        mass = (mass_w + mass_l) / 2
        metrics["mask_mass"] = mass.mean()
        return (neg_logsigmoid(u - d) + self.l1 * mass,
                self.beta * (ratio_w + kl_w), self.beta * (ratio_l + kl_l))
