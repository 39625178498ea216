"""raypo.losses: every preference loss of ../shared/LOSSES.md behind one interface.

    from raypo.losses import build, PreferenceBatch, LossOutput, LOSSES
    loss_fn = build("dpo", beta=0.1)
    out = loss_fn(batch)   # out.loss, out.chosen_rewards, out.rejected_rewards, out.metrics

Pure torch: nothing here imports ray, transformers or the rest of raypo. Losses with learnable
parts (kernel parameters, HMK weights, SparsePO masks, learnable priors) are nn.Modules: give
`loss_fn.parameters()` to the optimizer too; stateful losses (epsilon_dpo, beta_dpo) keep their
state in buffers, so `state_dict()` resumes them, and need `loss_fn.on_step_end()` after each
optimizer step.
"""

from raypo.losses import (  # noqa: F401  (each module registers its members)
    baseline,
    beta_dpo,
    cal_dpo,
    epsilon_dpo,
    fdpo,
    kernel_dpo,
    mi_dpo,
    priors,
    schedules,
    sparsepo,
    tdpo,
)
from raypo.losses.base import PreferenceLoss
from raypo.losses.batch import LossOutput, PreferenceBatch, TopKLogits
from raypo.losses.divergences import Divergence
from raypo.losses.kernels import Kernel
from raypo.losses.registry import DIVERGENCES, KERNELS, LOSSES, PRIORS, SCHEDULES, Registry

build = LOSSES.create
divergence = DIVERGENCES.create
kernel = KERNELS.create
prior = PRIORS.create
schedule = SCHEDULES.create

__all__ = [
    "DIVERGENCES", "KERNELS", "LOSSES", "PRIORS", "SCHEDULES", "Divergence", "Kernel",
    "LossOutput", "PreferenceBatch", "PreferenceLoss", "Registry", "TopKLogits", "build",
    "divergence", "kernel", "prior", "schedule",
]
