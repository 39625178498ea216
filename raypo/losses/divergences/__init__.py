"""Token-level divergences D(P_t || Q_t) between policy and reference next-token distributions,
chosen by name: `divergence("renyi", alpha=1.01)(policy_logits, ref_logits)`.

Importing the family modules registers their members in `DIVERGENCES`.
"""

from raypo.losses.divergences import closed_form, fdiv, wasserstein  # noqa: F401  (register)
from raypo.losses.divergences.base import LOG_FLOOR, Divergence, common_support
from raypo.losses.registry import DIVERGENCES

divergence = DIVERGENCES.create

__all__ = ["DIVERGENCES", "LOG_FLOOR", "Divergence", "common_support", "divergence"]
