"""Shared plumbing of the adaptive-beta losses: statistics gathered over the forward passes of
one optimizer step (all gradient-accumulation micro-batches, all workers) and consumed once in
`on_step_end`."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


class StepStatistic(nn.Module):
    """A running (sum, count) over one optimizer step, all-reduced across workers on read."""

    def __init__(self):
        super().__init__()
        self.register_buffer("total", torch.zeros((), dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    def add(self, values: Tensor) -> None:
        self.total += values.detach().double().sum()
        self.count += values.numel()

    def take_mean(self) -> float | None:
        """The mean over the step on every worker (None if nothing was added); resets."""
        both = torch.stack([self.total, self.count])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(both)
        self.total.zero_()
        self.count.zero_()
        return None if both[1] == 0 else float(both[0] / both[1])
