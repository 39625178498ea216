"""DPO-Kernels (Das et al. 2025, arXiv 2501.03271): the hybrid kernel loss and its
hierarchical mixture of kernels."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

import raypo.losses.kernels  # noqa: F401  (registers the kernels)
from raypo.losses.base import PreferenceLoss, neg_logsigmoid
from raypo.losses.batch import EMBEDDING_FIELDS, SEQUENCE_FIELDS, PreferenceBatch
from raypo.losses.describe import Needs, default_of, own_parameters
from raypo.losses.modifiers import MODIFIERS
from raypo.losses.penalty import PENALTY_FIELDS, DivergencePenalty
from raypo.losses.registry import DIVERGENCES, KERNELS, LOSSES, check_nonnegative


def split_params(kernel_name: str, divergence_name: str | None, params: dict, owner: str
                 ) -> tuple[dict, dict]:
    """Send each extra keyword to the kernel or the divergence that accepts it.

    A name both accept must be prefixed (`kernel_alpha=` / `divergence_alpha=`).
    """
    k_allowed = set(KERNELS.parameters(kernel_name))
    d_allowed = set(DIVERGENCES.parameters(divergence_name)) if divergence_name else set()
    k_params, d_params = {}, {}
    for key, value in params.items():
        if key.startswith("kernel_") and key[7:] in k_allowed:
            k_params[key[7:]] = value
        elif key.startswith("divergence_") and key[11:] in d_allowed:
            d_params[key[11:]] = value
        elif key in k_allowed and key in d_allowed:
            raise ValueError(f"{owner}: parameter {key!r} is ambiguous (both kernel "
                             f"{kernel_name!r} and divergence {divergence_name!r} take it); "
                             f"write kernel_{key} or divergence_{key}")
        elif key in k_allowed:
            k_params[key] = value
        elif key in d_allowed:
            d_params[key] = value
        else:
            allowed = sorted(k_allowed | d_allowed)
            raise ValueError(f"{owner}: unknown parameter {key!r}; kernel {kernel_name!r} "
                             f"and divergence {divergence_name!r} take: "
                             f"{', '.join(allowed) or '(none)'}")
    return k_params, d_params


@LOSSES.register("kernel_dpo")
class KernelDPO(PreferenceLoss):
    """DPO-Kernels hybrid loss (arXiv 2501.03271):
    `-log sigma(beta delta + gamma [log K(e_x, e_w) - log K(e_x, e_l)]) + alpha_div D_penalty`.

    The embedding term adds a semantic margin: how much closer (under kernel K) the chosen
    response's embedding is to the prompt's than the rejected one's; gamma (default 0.1) weighs
    it and 0 gives back DPO. D_penalty = mean_t D(P_t || Q_t) over the response tokens, any
    name in DIVERGENCES (default none), weighted by alpha_div (default 0.01). The kernel
    (default rbf) and the divergence take their own parameters by keyword (`sigma`, `degree`,
    `c`, `alpha`, ...). The paper's exact equation was not readable; this is the project's
    reading, consistent with the authors' public scripts. Kernels that learn from the data
    (mahalanobis, spectral eigen) are fitted with `fit(embeddings)` before training.

    Formula and paper: docs/losses.md#loss-kernel_dpo
    """

    options = MODIFIERS

    family = "kernel"
    selection_params = ("kernel", "divergence")
    kernel_weight_param = "gamma"

    def __init__(self, beta: float = 0.1, gamma: float = 0.1, kernel: str = "rbf",
                 divergence: str | None = None, alpha_div: float = 0.01, **params):
        super().__init__(beta)
        k_params, d_params = split_params(kernel, divergence, params, type(self).name)
        self.gamma = float(gamma)
        self.kernel = KERNELS.create(kernel, **k_params)
        # 0 is a legitimate ablation point: the penalty computed and logged, weighing nothing
        self.alpha_div = check_nonnegative(type(self).name, "alpha_div", alpha_div)
        self.penalty = DivergencePenalty(divergence, **d_params) if divergence else None
        self.requires = type(self).needs(kernel=kernel, divergence=divergence, **params).fields

    @classmethod
    def parts(cls, params: dict[str, Any]) -> tuple[str, str | None]:
        """(kernel, divergence) of a loss built with `params`."""
        kernel = params.get("kernel", default_of(cls, "kernel"))
        return kernel, params.get("divergence", default_of(cls, "divergence"))

    @classmethod
    def needs(cls, **params) -> Needs:
        kernel, divergence = cls.parts(params)
        own = own_parameters(cls) | {"kernel"}
        k_params, _ = split_params(kernel, divergence,
                                   {k: v for k, v in params.items() if k not in own}, cls.name)
        fields = SEQUENCE_FIELDS | EMBEDDING_FIELDS | (PENALTY_FIELDS if divergence
                                                       else frozenset())
        return Needs(fields, fitted_embeddings=KERNELS.get_class(kernel).fits_data(**k_params))

    @classmethod
    def identity(cls, **params) -> dict[str, Any]:
        kernel, divergence = cls.parts(params)
        return {**super().identity(**params), "kernel": kernel, "divergence": divergence}

    def fit(self, embeddings: Tensor) -> KernelDPO:
        """Fit data-dependent kernel statistics (covariance, eigenvectors) once per dataset."""
        self.kernel.fit(embeddings)
        return self

    def pair_losses(self, batch: PreferenceBatch, metrics: dict) -> Tensor:
        # one kernel call for both responses: half the launches of two calls
        prompt = batch.prompt_embeddings
        log_k = self.kernel(torch.cat([prompt, prompt]),
                            torch.cat([batch.chosen_embeddings, batch.rejected_embeddings]))
        log_k_w, log_k_l = log_k.chunk(2)
        semantic = log_k_w - log_k_l
        metrics["kernel_margin"] = semantic.mean()
        losses = neg_logsigmoid(self.beta * batch.margin + self.gamma * semantic)
        if self.penalty is not None:
            penalty = self.penalty(batch)
            metrics["divergence_penalty"] = penalty.mean()
            losses = losses + self.alpha_div * penalty
        return losses


@LOSSES.register("hmk_dpo")
class HMKDPO(KernelDPO):
    """DPO-Kernels with the Hierarchical Mixture of Kernels (arXiv 2501.03271):
    K = tau_L (w_rbf K_rbf + w_poly K_poly) + tau_G (w_spec K_spec + w_maha K_maha),
    the weights softmaxes of learnable logits (init 0), the kernel parameters learnable too,
    in the hybrid loss of `kernel_dpo`, minus `entropy_weight` (default 0.01) times the entropy
    of the three weight pairs, which guards against collapse onto one kernel. The learned
    weights are logged as metrics `w_*`/`tau_*`. Other parameters as kernel_dpo.

    Formula and paper: docs/losses.md#loss-hmk_dpo
    """

    selection_params = ()  # its kernel is learned, not chosen

    @classmethod
    def parts(cls, params: dict[str, Any]) -> tuple[str, str | None]:
        return "hmk", params.get("divergence")

    def __init__(self, beta: float = 0.1, gamma: float = 0.1, divergence: str | None = None,
                 alpha_div: float = 0.01, entropy_weight: float = 0.01, **params):
        super().__init__(beta=beta, gamma=gamma, kernel="hmk", divergence=divergence,
                         alpha_div=alpha_div, **params)
        self.entropy_weight = float(entropy_weight)

    def pair_losses(self, batch: PreferenceBatch, metrics: dict) -> Tensor:
        losses = super().pair_losses(batch, metrics)
        metrics.update(self.kernel.weights())
        entropy = self.kernel.entropy()
        metrics["kernel_entropy"] = entropy
        return losses - self.entropy_weight * entropy
