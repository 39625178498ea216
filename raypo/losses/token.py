"""Per-token quantities that several losses share: log-probs of labels under some logits, a
divergence between two next-token distributions evaluated on response tokens only, and how a
loss reads a per-position term (`token_values`) whether the trainer computed it in chunks or
the batch holds full logits."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from raypo.losses.base import masked_sum
from raypo.losses.batch import Logits, PreferenceBatch, TokenTerm, TopKLogits
from raypo.losses.divergences import divergence

# KL(Q_t || P_t), reference to policy, at every position: TDPO's and SparsePO's token term
REFERENCE_KL = "kl_ref_policy"


def label_logps(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """sum_t mask_t * log softmax(logits_t)[labels_t], shape (B,)."""
    token = torch.log_softmax(logits.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return masked_sum(token, mask)


def _select(logits: Logits, mask: Tensor) -> Logits:
    return logits.select(mask) if isinstance(logits, TopKLogits) else logits[mask]


def token_divergence(div: nn.Module, p_logits: Logits, q_logits: Logits, mask: Tensor) -> Tensor:
    """D(P_t || Q_t) at every position (B, T), 0 at padding.

    With two full-vocabulary sides only the masked positions are evaluated, so padding costs no
    vocabulary-sized work. With a top-k side every position is evaluated and padding zeroed
    afterwards: the divergence then reduces each row to k + 1 bins in one fused pass, which is
    cheaper than first copying the masked vocabulary-sized rows out (and back in backward).
    """
    keep = mask.bool()
    if isinstance(p_logits, TopKLogits) or isinstance(q_logits, TopKLogits):
        values = div(p_logits, q_logits)
        return torch.where(keep, values, torch.zeros((), dtype=values.dtype,
                                                     device=values.device))
    values = div(_select(p_logits, keep), _select(q_logits, keep))
    out = torch.zeros(keep.shape, dtype=values.dtype, device=values.device)
    return out.masked_scatter(keep, values)


def sequence_divergence(div: nn.Module, p_logits: Logits, q_logits: Logits,
                        mask: Tensor) -> Tensor:
    """sum_t D(P_t || Q_t) over the response tokens, shape (B,)."""
    return token_divergence(div, p_logits, q_logits, mask).sum(-1)


def reference_kl(policy_logits: Logits, ref_logits: Logits, labels: Tensor, mask: Tensor
                 ) -> Tensor:
    """KL(Q_t || P_t) per position (a TokenTerm): Q the reference's, P the policy's."""
    return token_divergence(divergence("kl"), ref_logits, policy_logits, mask)


def token_values(batch: PreferenceBatch, side: str, key: str, term: TokenTerm) -> Tensor:
    """The per-position term `key` of `side` ("chosen" or "rejected"), (B, T), 0 at padding
    (a term zeroes padding itself):
    as the trainer computed it in chunks (`<side>_token_terms`), else `term` evaluated on the
    batch's full logits."""
    given = getattr(batch, f"{side}_token_terms")
    if given is not None:
        return given[key]
    mask = getattr(batch, f"{side}_mask")
    return term(getattr(batch, f"policy_{side}_logits").float(),
                getattr(batch, f"ref_{side}_logits"), getattr(batch, f"{side}_labels"), mask)


def token_terms(loss: nn.Module) -> dict[str, TokenTerm]:
    """Every per-position term the loss and its parts declare (`token_terms()` on any of its
    modules); equal keys name the same quantity."""
    terms: dict[str, TokenTerm] = {}
    for module in loss.modules():
        declared = getattr(module, "token_terms", None)
        if callable(declared):
            terms.update(declared())
    return terms
