"""beta-DPO (Wu et al. 2024, "beta-DPO: Direct Preference Optimization with Dynamic beta",
arXiv 2407.08639, NeurIPS 2024)."""

from __future__ import annotations

import math

import torch

from raypo.losses.adaptive import StepStatistic
from raypo.losses.base import PreferenceLoss, neg_logsigmoid
from raypo.losses.batch import PreferenceBatch
from raypo.losses.registry import LOSSES, check_range

MIN_BETA = 1e-3


@LOSSES.register("beta_dpo")
class BetaDPO(PreferenceLoss):
    """beta-DPO (arXiv 2407.08639): batch-level
    beta_b = max(beta0 (1 + a (mean(M_sel) - M0)), 1e-3) and
    `-log sigma(beta_b delta)` averaged over the selected pairs.

    M_i = delta_i is each pair's margin and M0 an exponential moving average of the batch-mean
    margin (momentum 0.9), updated after each optimizer step over the whole step and all
    workers; informative batches (large margins) get a larger beta. Data filtering: each pair
    is weighted by a Gaussian exp(-(M_i - M0)^2 / (2 s^2)) around M0 (s the batch's standard
    deviation of margins) and the `keep` share (default 0.8, i.e. 20% filtered) with the
    largest weights is kept; the paper samples by these weights, this reading keeps the top
    ones so that a run is deterministic. Defaults beta0 = beta 0.1, a 0.6.

    Formula and paper: docs/losses.md#loss-beta_dpo
    """

    family = "adaptive-beta"

    def __init__(self, beta: float = 0.1, a: float = 0.6, keep: float = 0.8,
                 momentum: float = 0.9):
        super().__init__(beta)
        self.a = float(a)
        self.keep = check_range("beta_dpo", "keep", keep, 0.0, 1.0, low_open=True)
        self.momentum = check_range("beta_dpo", "momentum", momentum, 0.0, 1.0, high_open=True)
        self.register_buffer("m0", torch.zeros((), dtype=torch.float64))
        self.register_buffer("m0_initialized", torch.zeros((), dtype=torch.bool))
        self.margins = StepStatistic()

    def forward(self, batch: PreferenceBatch):
        batch.check(self.requires, self.name)
        margin = batch.margin
        m = margin.detach()
        m0 = self.m0.to(m.dtype) if self.m0_initialized else m.mean()
        spread = m.std() if m.numel() > 1 else torch.ones((), dtype=m.dtype, device=m.device)
        weight = torch.exp(-((m - m0) ** 2) / (2 * spread.clamp_min(1e-6) ** 2))
        n_keep = max(1, math.ceil(self.keep * m.numel()))
        selected = torch.zeros_like(m).scatter(0, weight.topk(n_keep).indices, 1.0)
        m_sel = (m * selected).sum() / n_keep
        beta_b = (self.beta * (1 + self.a * (m_sel - m0))).clamp_min(MIN_BETA)
        if self.training:
            self.margins.add(m)
        metrics = {"beta_batch": beta_b, "margin_ema": m0, "kept_share": selected.mean()}
        losses = neg_logsigmoid(beta_b * margin)
        return self.reduce(batch, losses, metrics, weights=selected,
                           rewards=(beta_b * batch.chosen_logratios,
                                    beta_b * batch.rejected_logratios))

    def on_step_end(self) -> None:
        mean_m = self.margins.take_mean()
        if mean_m is None:
            return
        if self.m0_initialized:
            self.m0.mul_(self.momentum).add_((1 - self.momentum) * mean_m)
        else:
            self.m0.fill_(mean_m)
            self.m0_initialized.fill_(True)
