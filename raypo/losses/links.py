"""More link functions of the log-ratio margin (the baseline family's shape): EXO's reverse KL to
smoothed labels, DiscoPOP's discovered blend and the length-normalised sigmoid. TRL 1.16's
`loss_type` exo_pair, discopop and sigmoid_norm (tests/losses/test_trl.py runs TRL's code).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from raypo.losses.base import PreferenceLoss, neg_logsigmoid
from raypo.losses.batch import PreferenceBatch
from raypo.losses.modifiers import MODIFIERS
from raypo.losses.registry import LOSSES, check_positive, check_range


@LOSSES.register("exo_pair")
class EXOPair(PreferenceLoss):
    """EXO, pairwise (Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model
    Alignment", arXiv 2402.00856, Eq. 16):
    `q_w (log q_w - log(1-eps)) + q_l (log q_l - log eps)`, q_w = sigma(beta delta) = 1 - q_l.

    The KL from the policy's preference distribution over the pair, softmax of the implicit
    rewards, to the smoothed label distribution (1-eps, eps): the reverse KL, mode-seeking like
    RLHF itself, where DPO minimises the forward one. eps is TRL's `label_smoothing` (default
    1e-3 as the paper recommends, in (0, 0.5)); beta default 0.1.

    Formula and paper: docs/losses.md#loss-exo_pair
    """

    options = MODIFIERS

    def __init__(self, beta: float = 0.1, eps: float = 1e-3):
        super().__init__(beta)
        self.eps = check_range("exo_pair", "eps", eps, 0.0, 0.5, low_open=True, high_open=True)

    def pair_losses(self, batch: PreferenceBatch, metrics: dict) -> Tensor:
        z = self.beta * batch.margin
        # log sigma as -softplus: F.logsigmoid's backward is ~50x slower on CPU (torch 2.13)
        return (torch.sigmoid(z) * (-neg_logsigmoid(z) - math.log1p(-self.eps))
                + torch.sigmoid(-z) * (-neg_logsigmoid(-z) - math.log(self.eps)))


@LOSSES.register("discopop")
class DiscoPOP(PreferenceLoss):
    """DiscoPOP, the log-ratio modulated loss (Chris Lu et al. 2024, "Discovering Preference
    Optimization Algorithms with and for Large Language Models", arXiv 2406.08414, Eq. 5):
    `(1 - m) (-log sigma(z)) + m exp(-z)`, z = beta delta, m = sigma(z / tau).

    An LLM-discovered blend of the logistic (DPO) and exponential losses, weighted by the margin
    itself: logistic where the policy already prefers y_l, exponential where it prefers y_w.
    tau is TRL's `discopop_tau` (default 0.05, the paper's); beta default 0.1. m exp(-z) is
    computed as exp(log sigma(z/tau) - z), finite for tau < 1 however negative z is.

    Formula and paper: docs/losses.md#loss-discopop
    """

    options = MODIFIERS

    def __init__(self, beta: float = 0.1, tau: float = 0.05):
        super().__init__(beta)
        self.tau = check_positive("discopop", "tau", tau)

    def pair_losses(self, batch: PreferenceBatch, metrics: dict) -> Tensor:
        z = self.beta * batch.margin
        m = torch.sigmoid(z / self.tau)
        return (1 - m) * neg_logsigmoid(z) + torch.exp(-neg_logsigmoid(z / self.tau) - z)


@LOSSES.register("sigmoid_norm")
class SigmoidNorm(PreferenceLoss):
    """Length-normalised DPO (TRL's `sigmoid_norm`; the normalisation of SimPO, Meng et al. 2024,
    arXiv 2405.14734, kept with DPO's reference):
    `-log sigma(beta (h(y_w)/|y_w| - h(y_l)/|y_l|))`.

    The per-token log-ratio is the reward, so a long response cannot win by summing many small
    gains. beta default 0.1 (per token: larger values than DPO's are typical).

    Formula and paper: docs/losses.md#loss-sigmoid_norm
    """

    options = MODIFIERS

    def pair_losses(self, batch: PreferenceBatch, metrics: dict) -> Tensor:
        avg_w = batch.chosen_logratios / batch.chosen_lengths.clamp_min(1)
        avg_l = batch.rejected_logratios / batch.rejected_lengths.clamp_min(1)
        return neg_logsigmoid(self.beta * (avg_w - avg_l))
