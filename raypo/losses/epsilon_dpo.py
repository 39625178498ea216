"""epsilon-DPO (Lee et al. 2025, "KL Penalty Control via Perturbation for Direct Preference
Optimization", arXiv 2502.13177, code oddqueue/e-dpo)."""

from __future__ import annotations

import torch
from torch import Tensor

from raypo.losses.adaptive import StepStatistic
from raypo.losses.base import PreferenceLoss, neg_logsigmoid
from raypo.losses.batch import (
    LOGIT_FIELDS,
    MASK_FIELDS,
    SEQUENCE_FIELDS,
    PreferenceBatch,
    TopKLogits,
)
from raypo.losses.modifiers import WEIGHTING
from raypo.losses.registry import LOSSES, check_range
from raypo.losses.token import token_values


class PerturbedLogps:
    """log softmax(f + sign eps (f - f_ref))[y_t] per position (a TokenTerm, no gradient):
    the token log-probs under f (sign 0), f+ = (1+eps) f - eps f_ref (sign +1) or f- (-1).

    f+ (f-) is the policy that training with beta/(1+eps) (beta/(1-eps)) would have produced:
    the perturbation reuses the logits already computed, no extra forward pass.
    """

    def __init__(self, eps: float, sign: int):
        self.eps, self.sign = eps, sign

    def __call__(self, logits: Tensor, ref_logits: Tensor, labels: Tensor, mask: Tensor
                 ) -> Tensor:
        with torch.no_grad():
            f = logits.float()
            perturbed = f + self.sign * self.eps * (f - ref_logits.float())
            token = (perturbed.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
                     - torch.logsumexp(perturbed, -1))
            return token * mask


@LOSSES.register("epsilon_dpo")
class EpsilonDPO(PreferenceLoss):
    """epsilon-DPO (arXiv 2502.13177): `-log sigma(beta_i delta)`,
    beta_i = beta / (1 + eps s_i), per pair.

    With z = logp(y_w) - logp(y_l) under the policy logits f and the perturbed f+ and f-:
    s_i = +1 if z+ > z > z- (the preference grows as beta shrinks: relax the KL penalty),
    s_i = -1 if z- > z > z+ (tighten it), else 0. After each optimizer step the global beta
    becomes beta / (1 + eps mean(s)), the mean over the whole step and all workers. Needs
    full-vocabulary reference logits (f_ref enters the perturbation). Defaults eps 0.01,
    beta 0.01 (paper).

    Formula and paper: docs/losses.md#loss-epsilon_dpo
    """

    options = WEIGHTING

    family = "adaptive-beta"
    requires = SEQUENCE_FIELDS | LOGIT_FIELDS | MASK_FIELDS | {"chosen_labels", "rejected_labels"}
    full_reference_logits = True

    def __init__(self, beta: float = 0.01, eps: float = 0.01):
        super().__init__(beta)
        self.eps = check_range("epsilon_dpo", "eps", eps, 0.0, 1.0, high_open=True)
        self.signs = StepStatistic()
        self.perturbed = {f"logps_eps{sign:+d}:{self.eps!r}": PerturbedLogps(self.eps, sign)
                          for sign in (0, 1, -1)}

    def token_terms(self) -> dict:
        return dict(self.perturbed)

    def perturbation_signs(self, batch: PreferenceBatch) -> Tensor:
        if batch.chosen_token_terms is None and (  # terms given: computed from full ones
                isinstance(batch.ref_chosen_logits, TopKLogits)
                or isinstance(batch.ref_rejected_logits, TopKLogits)):
            raise ValueError("epsilon_dpo needs full-vocabulary reference logits, "
                             "not the top-k form")
        with torch.no_grad():
            (zw, zl), (zw_plus, zl_plus), (zw_minus, zl_minus) = (
                (token_values(batch, "chosen", key, term).sum(-1),
                 token_values(batch, "rejected", key, term).sum(-1))
                for key, term in self.perturbed.items())
            z, z_plus, z_minus = zw - zl, zw_plus - zl_plus, zw_minus - zl_minus
            up = (z_plus > z) & (z > z_minus)
            down = (z_minus > z) & (z > z_plus)
            return up.float() - down.float()

    def pair_losses(self, batch: PreferenceBatch, metrics: dict):
        s = self.perturbation_signs(batch)
        if self.training:
            self.signs.add(s)
        beta_i = self.beta / (1 + self.eps * s.to(self.beta.dtype))
        metrics["eps_sign_mean"] = s.mean()
        metrics["beta_pair_mean"] = beta_i.mean()
        h_w, h_l = batch.chosen_logratios, batch.rejected_logratios
        return neg_logsigmoid(beta_i * (h_w - h_l)), beta_i * h_w, beta_i * h_l

    def on_step_end(self) -> None:
        mean_s = self.signs.take_mean()
        if mean_s is not None:
            self.beta.div_(1 + self.eps * mean_s)
