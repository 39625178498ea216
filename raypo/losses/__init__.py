"""raypo.losses: every preference loss behind one interface (formulas and papers of every loss,
divergence, kernel, prior and schedule: docs/losses.md).

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
    anchored,
    aot,
    baseline,
    beta_dpo,
    cal_dpo,
    epsilon_dpo,
    fdpo,
    kernel_dpo,
    links,
    mi_dpo,
    mixture,
    priors,
    schedules,
    sft,
    sparsepo,
    tdpo,
)
from raypo.losses.base import PreferenceLoss, declared_identity, declared_needs
from raypo.losses.batch import LossOutput, PreferenceBatch, TopKLogits
from raypo.losses.describe import ModelFacts, Needs
from raypo.losses.divergences import Divergence
from raypo.losses.kernels import Kernel
from raypo.losses.registry import DIVERGENCES, KERNELS, LOSSES, PRIORS, SCHEDULES, Registry

# The loss a config gets when it names none, and the baseline a finalist is confirmed against.
DEFAULT_LOSS = "dpo"

build = LOSSES.create
divergence = DIVERGENCES.create
kernel = KERNELS.create
prior = PRIORS.create
schedule = SCHEDULES.create


def needs(name: str, **params) -> Needs:
    """What loss `name` built with `params` reads (`Needs`), without building it."""
    return declared_needs(name, params)


def identity(name: str, **params) -> dict:
    """How loss `name` built with `params` appears in a report row (loss, family, parts)."""
    return declared_identity(name, params)


def kernel_candidates() -> tuple[str, ...]:
    """The kernels the selection rule ranks, in registration order (which breaks ties)."""
    return tuple(name for name, cls in KERNELS.items() if cls.candidate)


def divergence_candidates() -> tuple[str, ...]:
    """The divergences the selection rule ranks, in registration order (which breaks ties)."""
    return tuple(name for name, cls in DIVERGENCES.items() if cls.candidate)

__all__ = [
    "DEFAULT_LOSS", "DIVERGENCES", "KERNELS", "LOSSES", "PRIORS", "SCHEDULES", "Divergence",
    "Kernel", "LossOutput", "ModelFacts", "Needs", "PreferenceBatch", "PreferenceLoss", "Registry",
    "TopKLogits", "build", "divergence", "divergence_candidates",
    "identity", "kernel", "kernel_candidates", "needs", "prior", "schedule",
]
