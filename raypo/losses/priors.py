"""Priors zeta for the mutual-information loss (mi_dpo).

A prior maps a batch to (log zeta(y_w), log zeta(y_l)), each (B,). With a = beta, these priors
reproduce known methods exactly (derivations in each docstring, checked in the tests):
reference -> DPO, simpo -> SimPO, rdpo -> R-DPO, tdpo1/tdpo2 -> TDPO, sparsepo -> SparsePO.
A prior may have parameters; they are trained jointly with the policy.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from raypo.losses.batch import POLICY_SEQUENCE_FIELDS, SEQUENCE_FIELDS, PreferenceBatch
from raypo.losses.registry import PRIORS, check_positive
from raypo.losses.sparsepo import SPARSEPO_FIELDS, TokenMaskHead, sparse_terms
from raypo.losses.tdpo import SEQ_KL_FIELDS, ReadsReferenceKL, sequential_kls


class Prior(nn.Module):
    """log zeta(y) for chosen and rejected responses; `requires` lists the batch fields."""

    name: str = "?"
    requires: frozenset[str] = SEQUENCE_FIELDS

    def forward(self, batch: PreferenceBatch, beta: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


@PRIORS.register("reference")
class ReferencePrior(Prior):
    """log zeta(y) = ref(y): the reference model itself, which gives DPO.

    Formula and paper: docs/losses.md#prior-reference
    """

    def forward(self, batch, beta):
        return batch.ref_chosen_logps, batch.ref_rejected_logps


@PRIORS.register("simpo")
class SimPOPrior(Prior):
    """log zeta(y) = (1 - 1/|y|) logp(y), plus gamma/beta on y_w: then
    logp - log zeta = logp/|y|, and beta times the difference is SimPO's margin minus gamma.

    Formula and paper: docs/losses.md#prior-simpo
    """

    requires = POLICY_SEQUENCE_FIELDS

    def __init__(self, gamma: float = 1.0):
        super().__init__()
        self.gamma = float(gamma)

    def forward(self, batch, beta):
        # 1/n in the log-probs' dtype: integer lengths would give it in float32
        dtype = batch.policy_chosen_logps.dtype
        n_w = batch.chosen_lengths.clamp_min(1).to(dtype)
        n_l = batch.rejected_lengths.clamp_min(1).to(dtype)
        return ((1 - 1 / n_w) * batch.policy_chosen_logps + self.gamma / beta,
                (1 - 1 / n_l) * batch.policy_rejected_logps)


@PRIORS.register("rdpo")
class LengthPrior(Prior):
    """log zeta(y) = ref(y) - alpha |y| / beta: the margin gains alpha (|y_w| - |y_l|), R-DPO's
    length-penalised reward r - alpha |y|.

    Formula and paper: docs/losses.md#prior-rdpo
    """

    def __init__(self, alpha: float = 0.01):
        super().__init__()
        self.alpha = float(alpha)

    def forward(self, batch, beta):
        dtype = batch.ref_chosen_logps.dtype
        return (batch.ref_chosen_logps - self.alpha * batch.chosen_lengths.to(dtype) / beta,
                batch.ref_rejected_logps - self.alpha * batch.rejected_lengths.to(dtype) / beta)


@PRIORS.register("tdpo1")
class TDPO1Prior(ReadsReferenceKL, Prior):
    """log zeta(y) = ref(y) - SeqKL(y), SeqKL(y) = sum_t KL(Q_t || P_t): gives TDPO1.

    Formula and paper: docs/losses.md#prior-tdpo1
    """

    requires = SEQUENCE_FIELDS | SEQ_KL_FIELDS

    def forward(self, batch, beta):
        kl_w, kl_l = sequential_kls(batch)
        return batch.ref_chosen_logps - kl_w, batch.ref_rejected_logps - kl_l


@PRIORS.register("tdpo2")
class TDPO2Prior(ReadsReferenceKL, Prior):
    """log zeta(y) = ref(y) - alpha SeqKL(y), with a stop-gradient on y_w's SeqKL: TDPO2.

    Formula and paper: docs/losses.md#prior-tdpo2
    """

    requires = SEQUENCE_FIELDS | SEQ_KL_FIELDS

    def __init__(self, alpha: float = 0.5):
        super().__init__()
        self.alpha = check_positive("tdpo2 prior", "alpha", alpha)

    def forward(self, batch, beta):
        kl_w, kl_l = sequential_kls(batch)
        return (batch.ref_chosen_logps - self.alpha * kl_w.detach(),
                batch.ref_rejected_logps - self.alpha * kl_l)


@PRIORS.register("sparsepo")
class SparsePOPrior(ReadsReferenceKL, Prior):
    """log zeta(y) = logp(y) - sum_t m_u(t) [logp_t - ref_t] - sum_t m_d(t) KL_t(Q_t || P_t),
    with SparsePO's learned masks (a parameterised prior). The L1 penalty on the masks is the
    loss's (`mi_dpo` adds `l1 * mask mass` for this prior).

    Formula and paper: docs/losses.md#prior-sparsepo
    """

    requires = SEQUENCE_FIELDS | SPARSEPO_FIELDS

    def __init__(self, l1: float = 1e-3, hidden_size: int | None = None):
        super().__init__()
        self.l1 = float(l1)
        self.head = TokenMaskHead(hidden_size)
        self.penalty: Tensor | None = None

    def forward(self, batch, beta):
        (ratio_w, kl_w, mass_w), (ratio_l, kl_l, mass_l) = sparse_terms(self.head, batch)
        self.penalty = self.l1 * (mass_w + mass_l) / 2
        return (batch.policy_chosen_logps - ratio_w - kl_w,
                batch.policy_rejected_logps - ratio_l - kl_l)


@PRIORS.register("learnable")
class LearnablePrior(Prior):
    """log zeta(y) = rho ref(y) + (1 - rho)(1 - 1/|y|) logp(y) + theta |y|, rho in [0, 1] and
    theta learned jointly with the policy.

    The family the mutual-information paper proposes to search: rho = 1, theta = 0 is DPO
    (the initial point, `rho`/`theta` parameters); rho = 0 is SimPO without margin; theta plays
    R-DPO's -alpha/beta. Gradients on rho stop at the ends of [0, 1] (clamp).

    Formula and paper: docs/losses.md#prior-learnable
    """

    def __init__(self, rho: float = 1.0, theta: float = 0.0):
        super().__init__()
        self.rho_raw = nn.Parameter(torch.tensor(float(rho)))
        self.theta = nn.Parameter(torch.tensor(float(theta)))

    @property
    def rho(self) -> Tensor:
        return self.rho_raw.clamp(0.0, 1.0)

    def _log_zeta(self, logp: Tensor, ref: Tensor, n: Tensor) -> Tensor:
        n = n.to(logp.dtype)
        return (self.rho * ref + (1 - self.rho) * (1 - 1 / n.clamp_min(1)) * logp
                + self.theta * n)

    def forward(self, batch, beta):
        return (self._log_zeta(batch.policy_chosen_logps, batch.ref_chosen_logps,
                               batch.chosen_lengths),
                self._log_zeta(batch.policy_rejected_logps, batch.ref_rejected_logps,
                               batch.rejected_lengths))
