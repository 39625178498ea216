"""beta schedules: `schedule(name, **params)(step) -> beta` for a step counted from 0.

The trainer calls `loss.set_beta(schedule(step))` before each optimizer step. The adaptive rules
(epsilon_dpo, beta_dpo) are losses, not schedules: their beta depends on the data.
"""

from __future__ import annotations

import math

from raypo.losses.registry import SCHEDULES, check_positive


class Schedule:
    name: str = "?"

    def __init__(self, beta: float = 0.1):
        self.beta = check_positive(f"schedule {self.name}", "beta", beta)

    def __call__(self, step: int) -> float:
        raise NotImplementedError

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{self.name}({params})"


def _progress(step: int, total_steps: int) -> float:
    return min(max(step, 0), total_steps) / total_steps


@SCHEDULES.register("constant")
class Constant(Schedule):
    """beta(step) = beta.

    Formula and paper: docs/losses.md#schedule-constant
    """

    def __call__(self, step: int) -> float:
        return self.beta


class _Annealed(Schedule):
    def __init__(self, beta: float = 0.1, end_beta: float = 0.01, total_steps: int = 1000):
        super().__init__(beta)
        self.end_beta = check_positive(f"schedule {self.name}", "end_beta", end_beta)
        self.total_steps = int(check_positive(f"schedule {self.name}", "total_steps",
                                              total_steps))


@SCHEDULES.register("linear")
class Linear(_Annealed):
    """beta(step) = beta + (end_beta - beta) * min(step / total_steps, 1).

    Formula and paper: docs/losses.md#schedule-linear
    """

    def __call__(self, step: int) -> float:
        return self.beta + (self.end_beta - self.beta) * _progress(step, self.total_steps)


@SCHEDULES.register("cosine")
class Cosine(_Annealed):
    """beta(step) = end_beta + (beta - end_beta) (1 + cos(pi min(step/total_steps, 1))) / 2.

    Formula and paper: docs/losses.md#schedule-cosine
    """

    def __call__(self, step: int) -> float:
        p = _progress(step, self.total_steps)
        return self.end_beta + (self.beta - self.end_beta) * (1 + math.cos(math.pi * p)) / 2


@SCHEDULES.register("exponential")
class Exponential(Schedule):
    """beta(step) = max(beta * decay^step, min_beta); decay > 1 grows beta instead.

    Formula and paper: docs/losses.md#schedule-exponential
    """

    def __init__(self, beta: float = 0.1, decay: float = 0.999, min_beta: float = 1e-3):
        super().__init__(beta)
        self.decay = check_positive("schedule exponential", "decay", decay)
        self.min_beta = check_positive("schedule exponential", "min_beta", min_beta)

    def __call__(self, step: int) -> float:
        return max(self.beta * self.decay ** max(step, 0), self.min_beta)


@SCHEDULES.register("step")
class Step(Schedule):
    """beta(step) = beta * factor^(step // step_size).

    Formula and paper: docs/losses.md#schedule-step
    """

    def __init__(self, beta: float = 0.1, step_size: int = 100, factor: float = 0.5):
        super().__init__(beta)
        self.step_size = int(check_positive("schedule step", "step_size", step_size))
        self.factor = check_positive("schedule step", "factor", factor)

    def __call__(self, step: int) -> float:
        return self.beta * self.factor ** (max(step, 0) // self.step_size)


@SCHEDULES.register("warmup_decay")
class WarmupDecay(Schedule):
    """Linear warm-up from start_beta to beta over warmup_steps, then cosine decay to end_beta
    at total_steps: a weak constraint early lets the policy move, a strong one late holds it.

    Formula and paper: docs/losses.md#schedule-warmup_decay
    """

    def __init__(self, beta: float = 0.1, start_beta: float = 0.01, warmup_steps: int = 100,
                 end_beta: float = 0.01, total_steps: int = 1000):
        super().__init__(beta)
        owner = "schedule warmup_decay"
        self.start_beta = check_positive(owner, "start_beta", start_beta)
        self.end_beta = check_positive(owner, "end_beta", end_beta)
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        if not 0 <= self.warmup_steps < self.total_steps:
            raise ValueError(f"{owner}: need 0 <= warmup_steps < total_steps, got "
                             f"{warmup_steps} and {total_steps}")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.start_beta + (self.beta - self.start_beta) * step / self.warmup_steps
        p = _progress(step - self.warmup_steps, self.total_steps - self.warmup_steps)
        return self.end_beta + (self.beta - self.end_beta) * (1 + math.cos(math.pi * p)) / 2
