"""The NLL of the chosen response: TRL 1.16's `loss_type` sft, alone or in a mixture."""

from __future__ import annotations

from torch import Tensor

from raypo.losses.base import PreferenceLoss, masked_sum
from raypo.losses.batch import POLICY_SEQUENCE_FIELDS, PreferenceBatch
from raypo.losses.registry import LOSSES


@LOSSES.register("sft")
class SFT(PreferenceLoss):
    """Supervised fine-tuning on the chosen responses: `-sum_t log pi(y_w,t) / N`, the sum over
    every chosen response token of the batch and N their number (a token mean over the batch,
    as TRL computes it, not a mean of per-pair means).

    Alone it is the SFT baseline on preference data; in a mixture beside DPO it is RPO (Pang et
    al. 2024, "Iterative Reasoning Preference Optimization", arXiv 2404.19733: `dpo` plus
    rpo_alpha times this, `terms: [{name: dpo, weight: 1}, {name: sft, weight: rpo_alpha}]`)
    and the third term of MPO. No parameters, no defaults to tune (no beta: set_beta has no
    effect), and no modifier: LD-DPO rewrites only the sequence log-probs this loss does not
    read (TRL's sft ignores ld_alpha too), and WPO weighs preference pairs (TRL 1.16's sft
    with use_weighting fails: it multiplies an expanded tensor in place). The reward it logs
    is the length-averaged policy log-prob of each response.

    Formula and paper: docs/losses.md#loss-sft
    """

    family = "sft"
    requires = POLICY_SEQUENCE_FIELDS | {"policy_chosen_token_logps", "chosen_mask"}
    reference_free = True

    def __init__(self):
        super().__init__()

    def pair_losses(self, batch: PreferenceBatch, metrics: dict
                    ) -> tuple[Tensor, Tensor, Tensor]:
        mask = batch.chosen_mask
        nll = (-masked_sum(batch.policy_chosen_token_logps, mask).sum()
               / mask.sum().clamp_min(1).to(batch.policy_chosen_token_logps.dtype))
        # one value per pair, so that the mean over pairs is the token mean
        losses = nll.expand(batch.policy_chosen_token_logps.shape[0])
        return (losses,
                batch.policy_chosen_logps / batch.chosen_lengths.clamp_min(1),
                batch.policy_rejected_logps / batch.rejected_lengths.clamp_min(1))
