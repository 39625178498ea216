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
from raypo.losses.token import label_logps


def perturbed_margins(logits: Tensor, ref_logits: Tensor, labels: Tensor, mask: Tensor,
                      eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """logp(y) under f, f+ = (1+eps) f - eps f_ref and f- = (1-eps) f + eps f_ref, (B,) each.

    f+ (f-) is the policy that training with beta/(1+eps) (beta/(1-eps)) would have produced:
    the perturbation reuses the logits already computed, no extra forward pass.
    """
    delta = logits - ref_logits
    return (label_logps(logits, labels, mask),
            label_logps(logits + eps * delta, labels, mask),
            label_logps(logits - eps * delta, labels, mask))


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
    """

    options = WEIGHTING

    family = "adaptive-beta"
    requires = SEQUENCE_FIELDS | LOGIT_FIELDS | MASK_FIELDS | {"chosen_labels", "rejected_labels"}
    full_reference_logits = True

    def __init__(self, beta: float = 0.01, eps: float = 0.01):
        super().__init__(beta)
        self.eps = check_range("epsilon_dpo", "eps", eps, 0.0, 1.0, high_open=True)
        self.signs = StepStatistic()

    def perturbation_signs(self, batch: PreferenceBatch) -> Tensor:
        if isinstance(batch.ref_chosen_logits, TopKLogits) or isinstance(
                batch.ref_rejected_logits, TopKLogits):
            raise ValueError("epsilon_dpo needs full-vocabulary reference logits, "
                             "not the top-k form")
        with torch.no_grad():
            zw, zw_plus, zw_minus = perturbed_margins(
                batch.policy_chosen_logits.detach(), batch.ref_chosen_logits,
                batch.chosen_labels, batch.chosen_mask, self.eps)
            zl, zl_plus, zl_minus = perturbed_margins(
                batch.policy_rejected_logits.detach(), batch.ref_rejected_logits,
                batch.rejected_labels, batch.rejected_mask, self.eps)
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
