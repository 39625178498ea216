"""AOT (Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal
Transport", arXiv 2406.05882): TRL 1.16's `loss_type` aot and aot_unpaired."""

from __future__ import annotations

import torch
from torch import Tensor

from raypo.losses.base import PreferenceLoss, neg_logsigmoid
from raypo.losses.batch import PreferenceBatch
from raypo.losses.registry import LOSSES, check_range


class AlignmentViaOT(PreferenceLoss):
    """The cDPO form on a margin between sorted batches. Sorting pairs each quantile of one
    side with the same quantile of the other: in one dimension that is the optimal transport
    plan, and the loss asks for first-order stochastic dominance of the chosen distribution
    over the rejected one rather than for a margin on every pair. The per-pair losses are those
    of the sorted pairs, so WPO's per-pair weights do not apply (TRL refuses them too);
    LD-DPO does."""

    family = "distributional"
    options = {"ld_alpha": None}

    def __init__(self, beta: float = 0.1, eps: float = 0.0):
        super().__init__(beta)
        self.eps = check_range(self.name, "eps", eps, 0.0, 0.5, high_open=True)

    def sorted_margin(self, batch: PreferenceBatch) -> Tensor:
        raise NotImplementedError

    def pair_losses(self, batch: PreferenceBatch, metrics: dict) -> Tensor:
        z = self.beta * self.sorted_margin(batch)
        return (1 - self.eps) * neg_logsigmoid(z) + self.eps * neg_logsigmoid(-z)


@LOSSES.register("aot")
class AOT(AlignmentViaOT):
    """AOT, paired (arXiv 2406.05882):
    `-(1-eps) log sigma(beta d) - eps log sigma(-beta d)`,
    d = sort_B(logp(y_w) - logp(y_l)) - sort_B(ref(y_w) - ref(y_l)).

    The policy's distribution of chosen-minus-rejected log-prob gaps must dominate the
    reference's, quantile by quantile over the batch. eps is TRL's `label_smoothing` (default
    0, in [0, 0.5)); beta default 0.1. Needs batches of more than one pair to differ from DPO.

    Formula and paper: docs/losses.md#loss-aot
    """

    def sorted_margin(self, batch: PreferenceBatch) -> Tensor:
        policy = torch.sort(batch.policy_chosen_logps - batch.policy_rejected_logps, dim=0)[0]
        ref = torch.sort(batch.ref_chosen_logps - batch.ref_rejected_logps, dim=0)[0]
        return policy - ref


@LOSSES.register("aot_unpaired")
class AOTUnpaired(AlignmentViaOT):
    """AOT, unpaired (arXiv 2406.05882):
    `-(1-eps) log sigma(beta d) - eps log sigma(-beta d)`, d = sort_B(h(y_w)) - sort_B(h(y_l)).

    The chosen responses' log-ratios must dominate the rejected ones' as distributions, with no
    use of which response was paired with which (for data without pairs). eps is TRL's
    `label_smoothing` (default 0, in [0, 0.5)); beta default 0.1.

    Formula and paper: docs/losses.md#loss-aot_unpaired
    """

    def sorted_margin(self, batch: PreferenceBatch) -> Tensor:
        return (torch.sort(batch.chosen_logratios, dim=0)[0]
                - torch.sort(batch.rejected_logratios, dim=0)[0])
