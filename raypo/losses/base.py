"""The part every preference loss shares: beta, the checked batch, rewards, reduction, metrics,
and what a loss says about itself (what it reads, how it appears in a report row).

A loss subclass states what it reads (`requires`, or `needs()` when that depends on its
parameters) and writes `pair_losses`, the loss of each pair; the rest lives here once.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raypo.losses.batch import SEQUENCE_FIELDS, LossOutput, PreferenceBatch
from raypo.losses.describe import ModelFacts, Needs, bind
from raypo.losses.registry import check_positive


class PreferenceLoss(nn.Module):
    """Base of every loss. `beta` is a buffer so schedules and adaptive rules can change it and
    `state_dict()` carries it; `on_step_end()` is called by the trainer after each optimizer
    step (stateful losses override it)."""

    name: str = "?"
    # The loss's family in a report row (baseline, kernel, token-level, ...).
    family: ClassVar[str] = "baseline"
    requires: frozenset[str] = SEQUENCE_FIELDS
    #  Reference-free losses report beta * logp / |y| as their reward instead.
    reference_free: bool = False
    # True for a loss that needs full-vocabulary reference logits (the top-k cache will not
    # do): the trainer then runs the reference at every step instead of caching its logits.
    full_reference_logits: bool = False
    # The parameters naming the (kernel, divergence) pair the selection rule ranks, for a
    # loss whose pair it ranks; () for the others.
    selection_params: ClassVar[tuple[str, ...]] = ()
    # The parameter that weighs the kernel's margin in such a loss (the rule judges a
    # kernel's margin at that weight); None for the others.
    kernel_weight_param: ClassVar[str | None] = None

    def __init__(self, beta: float = 0.1):
        super().__init__()
        # float64 so that beta is exact; as a 0-dim tensor it does not up-cast the batch.
        self.register_buffer("beta", torch.tensor(check_positive(self.name, "beta", beta),
                                                  dtype=torch.float64))

    @classmethod
    def needs(cls, **params) -> Needs:
        """What a loss built with `params` reads; known without building it."""
        return Needs(frozenset(cls.requires), cls.full_reference_logits)

    @classmethod
    def identity(cls, **params) -> dict[str, Any]:
        """How a loss built with `params` appears in a report row: its name and family, and
        for composite losses their parts (kernel, divergence, prior)."""
        return {"loss": cls.name, "family": cls.family}

    def bind(self, facts: ModelFacts) -> PreferenceLoss:
        """Hand the model's facts to this loss and its parts (before the optimizer is made)."""
        bind(self, facts)
        return self

    def set_beta(self, value: float) -> None:
        """Set beta for the next steps (the trainer calls this with a schedule's value)."""
        self.beta.fill_(check_positive(self.name, "beta", value))

    def on_step_end(self) -> None:
        """Called once after each optimizer step; stateless losses do nothing."""

    def pair_losses(self, batch: PreferenceBatch, metrics: dict[str, Tensor]
                    ) -> Tensor | tuple[Tensor, Tensor, Tensor]:
        """The loss of each pair (B,); a loss whose reward is not beta * h returns
        (losses, chosen_rewards, rejected_rewards). Extra metrics go into `metrics`."""
        raise NotImplementedError

    def rewards(self, batch: PreferenceBatch) -> tuple[Tensor, Tensor]:
        """Per-pair implicit rewards for logging: beta * h(y), or beta * logp(y)/|y|."""
        if self.reference_free:
            return (
                self.beta * batch.policy_chosen_logps / batch.chosen_lengths.clamp_min(1),
                self.beta * batch.policy_rejected_logps / batch.rejected_lengths.clamp_min(1),
            )
        return self.beta * batch.chosen_logratios, self.beta * batch.rejected_logratios

    def forward(self, batch: PreferenceBatch) -> LossOutput:
        batch.check(self.requires, self.name)
        metrics: dict[str, Tensor] = {}
        out = self.pair_losses(batch, metrics)
        losses, *rewards = out if isinstance(out, tuple) else (out,)
        return self.reduce(batch, losses, metrics, rewards=tuple(rewards) or None)

    def reduce(self, batch: PreferenceBatch, losses: Tensor, metrics: dict[str, Tensor],
               weights: Tensor | None = None,
               rewards: tuple[Tensor, Tensor] | None = None) -> LossOutput:
        """Batch mean (weighted when `weights` is given) plus the standard metrics."""
        if weights is None:
            loss = losses.mean()
        else:
            loss = (losses * weights).sum() / weights.sum().clamp_min(1e-12)
        chosen, rejected = (r.detach() for r in (rewards or self.rewards(batch)))
        margins = chosen - rejected
        metrics.update(
            beta=self.beta.detach().clone(),
            reward_margin=margins.mean(),
            reward_accuracy=(margins > 0).float().mean(),
            chosen_reward=chosen.mean(),
            rejected_reward=rejected.mean(),
        )
        metrics = {k: v.detach() if isinstance(v, Tensor) else torch.tensor(v)
                   for k, v in metrics.items()}
        return LossOutput(loss=loss, chosen_rewards=chosen, rejected_rewards=rejected,
                          metrics=metrics)


def neg_logsigmoid(x: Tensor) -> Tensor:
    """-log sigma(x) = softplus(-x), finite and exact for any finite x."""
    return F.softplus(-x)


def masked_sum(x: Tensor, mask: Tensor) -> Tensor:
    """Sum over the last dimension where mask is 1, ignoring whatever stands at padding."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(-1)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return masked_sum(x, mask) / mask.sum(-1).clamp_min(1).to(x.dtype)
