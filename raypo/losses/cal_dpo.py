"""Cal-DPO (Xiao et al. 2024, arXiv 2412.14516, code tengxiao1/Cal-DPO)."""

from __future__ import annotations

from torch import Tensor

from raypo.losses.base import PreferenceLoss, neg_logsigmoid
from raypo.losses.batch import PreferenceBatch
from raypo.losses.modifiers import MODIFIERS
from raypo.losses.registry import LOSSES


@LOSSES.register("cal_dpo")
class CalDPO(PreferenceLoss):
    """Cal-DPO (arXiv 2412.14516):
    `-log sigma(delta) + 0.5 [(h_w - 1/(2 beta))^2 + (h_l + 1/(2 beta))^2]`.

    "Calibrates" the implicit rewards to the scale of the true ones: besides the contrastive
    term, each log-ratio is regressed to +-1/(2 beta), so the chosen reward cannot fall while
    the margin grows. beta sets only those targets (it is not inside the sigmoid). Default beta
    0.1 (the paper's code sweeps 1e-3-1e-2 on chat models); `length_normalize` uses per-token
    averages of h (the variant for data with long, uneven responses).

    Formula and paper: docs/losses.md#loss-cal_dpo
    """

    options = MODIFIERS

    family = "calibrated"

    def __init__(self, beta: float = 0.1, length_normalize: bool = False):
        super().__init__(beta)
        self.length_normalize = bool(length_normalize)

    def pair_losses(self, batch: PreferenceBatch, metrics: dict) -> Tensor:
        h_w, h_l = batch.chosen_logratios, batch.rejected_logratios
        if self.length_normalize:
            h_w = h_w / batch.chosen_lengths.clamp_min(1)
            h_l = h_l / batch.rejected_lengths.clamp_min(1)
        target = 1 / (2 * self.beta)
        calibration = 0.5 * ((h_w - target) ** 2 + (h_l + target) ** 2)
        metrics["calibration"] = calibration.mean()
        return neg_logsigmoid(h_w - h_l) + calibration
