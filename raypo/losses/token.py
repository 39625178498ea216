"""Per-token quantities that several losses share: log-probs of labels under some logits, and
a divergence between two next-token distributions evaluated on response tokens only."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from raypo.losses.base import masked_sum
from raypo.losses.batch import Logits, TopKLogits


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
