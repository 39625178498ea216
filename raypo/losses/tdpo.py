"""TDPO (Zeng et al. 2024, "Token-level Direct Preference Optimization", arXiv 2404.11999)."""

from __future__ import annotations

from torch import Tensor

from raypo.losses.base import PreferenceLoss, neg_logsigmoid
from raypo.losses.batch import LOGIT_FIELDS, MASK_FIELDS, SEQUENCE_FIELDS, PreferenceBatch
from raypo.losses.modifiers import WEIGHTING
from raypo.losses.registry import LOSSES, check_positive
from raypo.losses.token import REFERENCE_KL, reference_kl, token_values

SEQ_KL_FIELDS = LOGIT_FIELDS | MASK_FIELDS


def sequential_kls(batch: PreferenceBatch) -> tuple[Tensor, Tensor]:
    """SeqKL(y) = sum_t KL(Q_t || P_t) (reference to policy) for the chosen and rejected
    responses, shape (B,) each. The reference logits may be in top-k form; the per-token KL
    is a token term (`reference_kl`), computed in chunks by the trainer."""
    return tuple(token_values(batch, side, REFERENCE_KL, reference_kl).sum(-1)
                 for side in ("chosen", "rejected"))


class ReadsReferenceKL:
    """Declares the per-token KL(Q_t || P_t) term (for the trainer's chunked forward)."""

    def token_terms(self) -> dict:
        return {REFERENCE_KL: reference_kl}


@LOSSES.register("tdpo")
class TDPO(ReadsReferenceKL, PreferenceLoss):
    """TDPO (arXiv 2404.11999): `-log sigma(beta * (delta - D))` with a sequential-KL term D.

    - version 1: D = SeqKL(y_l) - SeqKL(y_w)
    - version 2: D = alpha * (SeqKL(y_l) - sg[SeqKL(y_w)]), sg = stop-gradient (default)
    SeqKL(y) = sum_t KL(pi_ref(.|x, y<t) || pi(.|x, y<t)) controls divergence token by token,
    keeping generation diverse while the margin grows. Defaults beta 0.1, alpha 0.5 (paper).

    Formula and paper: docs/losses.md#loss-tdpo
    """

    options = WEIGHTING

    family = "token-level"
    requires = SEQUENCE_FIELDS | SEQ_KL_FIELDS

    def __init__(self, beta: float = 0.1, version: int = 2, alpha: float = 0.5):
        super().__init__(beta)
        if version not in (1, 2):
            raise ValueError(f"tdpo: version must be 1 or 2, got {version!r}")
        self.version = version
        self.alpha = check_positive("tdpo", "alpha", alpha)

    def pair_losses(self, batch: PreferenceBatch, metrics: dict) -> Tensor:
        kl_w, kl_l = sequential_kls(batch)
        # version 2 lets no gradient through y_w's SeqKL
        d = kl_l - kl_w if self.version == 1 else self.alpha * (kl_l - kl_w.detach())
        metrics["seq_kl_chosen"] = kl_w.mean()
        metrics["seq_kl_rejected"] = kl_l.mean()
        return neg_logsigmoid(self.beta * (batch.margin - d))
