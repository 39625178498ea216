"""Two modifiers TRL applies to any of its loss types, here options of the losses they fit:
`build("dpo", use_weighting=True, ld_alpha=0.5)`, `loss: {name: ipo, ld_alpha: 0.3}`.

- WPO weighting (Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference
  Optimization", arXiv 2406.11827, Eq. 2; TRL `use_weighting`): each pair's loss is multiplied
  by w(y_w) w(y_l), w(y) = exp(mean_t [log p_t - log sum_v p_v^2]) under the policy, without
  gradient. Off-policy pairs (responses the policy itself would not produce) weigh less, which
  simulates on-policy data. log sum_v p_v^2 is computed once by the trainer's forward (batch
  fields `policy_*_log_sum_sq_probs`), so no vocabulary-sized tensor reaches the loss.
- LD-DPO (Liu et al. 2024, "Length Desensitization in Direct Preference Optimization",
  arXiv 2409.06411; TRL `ld_alpha`, in [0, 1]): in each pair, the per-token log-probs past the
  shorter response's length count with weight ld_alpha, for the policy and the reference alike,
  so that the verbose tail of the longer response cannot dominate the margin. 1 is plain DPO,
  0 compares only the shared length.

Why options rather than wrapper losses: TRL's users set them beside any loss type, and a search
space then treats them as ordinary parameters orthogonal to the loss's name (`use_weighting:
{choice: [false, true]}`). Why not options of every loss: each needs something the loss must
honour. WPO multiplies per-pair losses, so a loss that sorts its pairs across the batch (aot) or
reweights them itself (beta_dpo) does not take it; LD-DPO rewrites the summed sequence
log-probs, so it fits the losses built from those alone, not the token-level ones (tdpo,
sparsepo, epsilon_dpo), whose token terms it would leave inconsistent. A loss class lists what
it takes in `options` (MODIFIERS or WEIGHTING); the base class applies them in `forward`.

Formulas and papers: docs/losses.md#option-use_weighting, docs/losses.md#option-ld_alpha.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from raypo.losses.batch import (
    LOG_SUM_SQ_FIELDS,
    MASK_FIELDS,
    POLICY_TOKEN_FIELDS,
    REF_TOKEN_FIELDS,
    PreferenceBatch,
)
from raypo.losses.describe import Needs
from raypo.losses.registry import check_range

# The options (name -> default) a loss class declares in `options`.
WEIGHTING = {"use_weighting": False}
MODIFIERS = {"use_weighting": False, "ld_alpha": None}

WPO_FIELDS = POLICY_TOKEN_FIELDS | MASK_FIELDS | LOG_SUM_SQ_FIELDS
LD_FIELDS = POLICY_TOKEN_FIELDS | REF_TOKEN_FIELDS | MASK_FIELDS


def check_modifiers(owner: str, use_weighting: bool = False, ld_alpha: float | None = None
                    ) -> tuple[bool, float | None]:
    if not isinstance(use_weighting, bool):
        raise ValueError(f"{owner}: use_weighting must be true or false, got {use_weighting!r}")
    if ld_alpha is not None:
        ld_alpha = check_range(owner, "ld_alpha", ld_alpha, 0.0, 1.0)
    return use_weighting, ld_alpha


def modifier_needs(use_weighting: bool = False, ld_alpha: float | None = None) -> Needs:
    """The batch fields the modifiers read (beyond the loss's own)."""
    return Needs((WPO_FIELDS if use_weighting else frozenset())
                 | (LD_FIELDS if ld_alpha is not None else frozenset()))


def _mean_token_weight(token_logps: Tensor, log_sum_sq: Tensor, mask: Tensor) -> Tensor:
    keep = mask.bool()
    aligned = torch.where(keep, token_logps - log_sum_sq, torch.zeros((), dtype=token_logps.dtype,
                                                                       device=keep.device))
    return torch.exp(aligned.sum(-1) / mask.sum(-1).clamp_min(1).to(aligned.dtype))


@torch.no_grad()
def wpo_weights(batch: PreferenceBatch) -> Tensor:
    """w(y_w) w(y_l) per pair (B,), no gradient (WPO Eq. 2, as TRL computes it)."""
    w_w = _mean_token_weight(batch.policy_chosen_token_logps,
                             batch.policy_chosen_log_sum_sq_probs, batch.chosen_mask)
    w_l = _mean_token_weight(batch.policy_rejected_token_logps,
                             batch.policy_rejected_log_sum_sq_probs, batch.rejected_mask)
    return w_w * w_l


def _desensitized_sum(token_logps: Tensor, mask: Tensor, shared: Tensor, ld_alpha: float
                      ) -> Tensor:
    keep = mask.bool()
    in_shared = keep & (mask.cumsum(-1) <= shared[:, None])  # cumsum: 1, 2, ... on the tokens
    zero = torch.zeros((), dtype=token_logps.dtype, device=keep.device)
    shared_sum = torch.where(in_shared, token_logps, zero).sum(-1)
    tail_sum = torch.where(keep & ~in_shared, token_logps, zero).sum(-1)
    return shared_sum + ld_alpha * tail_sum


def desensitized(batch: PreferenceBatch, ld_alpha: float) -> PreferenceBatch:
    """The batch with LD-DPO's sequence log-probs: sum over the first min(|y_w|, |y_l|) tokens
    plus ld_alpha times the sum over the rest, for policy and reference (arXiv 2409.06411)."""
    shared = torch.minimum(batch.chosen_mask.sum(-1), batch.rejected_mask.sum(-1))
    return dataclasses.replace(
        batch,
        **{f"{model}_{side}_logps": _desensitized_sum(
            getattr(batch, f"{model}_{side}_token_logps"), getattr(batch, f"{side}_mask"),
            shared, ld_alpha)
           for model in ("policy", "ref") for side in ("chosen", "rejected")})
