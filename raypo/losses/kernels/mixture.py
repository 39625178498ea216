"""Hierarchical Mixture of Kernels (HMK) of DPO-Kernels (arXiv 2501.03271)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from raypo.losses.kernels.base import Kernel
from raypo.losses.kernels.basic import PolynomialKernel, RBFKernel
from raypo.losses.kernels.mahalanobis import MahalanobisKernel
from raypo.losses.kernels.spectral import SpectralKernel
from raypo.losses.registry import KERNELS

# Each group is a softmax over two members: (group, (first member, second member)).
GROUPS = (("tau", ("local", "global")), ("local", ("rbf", "polynomial")),
          ("global", ("spectral", "mahalanobis")))


@KERNELS.register("hmk")
class HierarchicalMixtureKernel(Kernel):
    """Hierarchical Mixture of Kernels (DPO-Kernels, arXiv 2501.03271):

        K = tau_L * (w_rbf * K_rbf + w_poly * K_poly) + tau_G * (w_spec * K_spec + w_maha * K_maha)

    where (tau_L, tau_G), (w_rbf, w_poly) and (w_spec, w_maha) are each a softmax over two
    logits (initialised to 0: every weight 1/2). Computed as
    `log K = logsumexp_i(log tau + log w_i + log K_i)` over the four components, so weights
    exactly (1, 0) give exactly that component's log K. `entropy()` is the entropy of the three
    softmaxes, for the loss's bonus against collapse onto one kernel; `weights()` is for logging.

    Args:
        learnable_weights: train the six logits (default True).
        weight_logits: initial logits, a dict with any of the keys "tau" (local, global),
            "local" (rbf, polynomial), "global" (spectral, mahalanobis), each a pair of floats;
            missing keys are (0, 0). -inf is allowed and gives that member weight exactly 0;
            with learnable_weights=False the weights stay as given.
        learnable_kernels: train the components' parameters too (default True).
        sigma: the RBF component's bandwidth, default 1.
        degree, c: the polynomial component's degree and offset, default 2 and 1.
        scales: the spectral (mixture) component's scales, default (0.1, 1.0, 10.0).
        dim, shrinkage: for the Mahalanobis component; a learnable matrix exists before the
            optimizer is built only if `dim` is given or `fit()` is called first.

    Formula and paper: docs/losses.md#kernel-hmk
    """

    candidate = False  # trained, not chosen: the selection ranks its members instead

    @classmethod
    def fits_data(cls, **params) -> bool:
        return True  # its Mahalanobis member

    def __init__(self, learnable_weights: bool = True,
                 weight_logits: Mapping[str, Sequence[float]] | None = None,
                 learnable_kernels: bool = True, sigma: float = 1.0, degree: float = 2,
                 c: float = 1.0, scales: Sequence[float] = (0.1, 1.0, 10.0),
                 dim: int | None = None, shrinkage: float | None = None):
        super().__init__()
        self.register_value("weight_logits", self._logits(weight_logits), learnable_weights)
        try:
            self.rbf = RBFKernel(sigma=sigma, learnable=learnable_kernels)
            self.polynomial = PolynomialKernel(degree=degree, c=c, learnable=learnable_kernels)
            self.spectral = SpectralKernel(scales=scales, learnable=learnable_kernels)
            self.mahalanobis = MahalanobisKernel(dim=dim, shrinkage=shrinkage,
                                                 learnable=learnable_kernels)
        except ValueError as error:  # say which kernel the user asked for, not only the part
            raise ValueError(f"{self.label}: {error}") from error

    def _logits(self, given: Mapping[str, Sequence[float]] | None) -> Tensor:
        given = dict(given or {})
        names = [group for group, _ in GROUPS]
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise ValueError(f"{self.label}: weight_logits has unknown keys {unknown}; "
                             f"expected any of {names}")
        rows = []
        for group, members in GROUPS:
            pair = [float(v) for v in given.get(group, (0.0, 0.0))]
            if (len(pair) != 2 or any(math.isnan(v) or v == math.inf for v in pair)
                    or max(pair) == -math.inf):
                raise ValueError(
                    f"{self.label}: weight_logits[{group!r}] must be two logits for {members}, "
                    f"finite or -inf and not both -inf, got {given.get(group)!r}")
            rows.append(pair)
        return torch.tensor(rows)

    def log_weights(self) -> Tensor:
        """(3, 2) log-softmax of the logits: rows tau, local, global as in GROUPS."""
        return self.weight_logits.log_softmax(-1)

    def weights(self) -> dict[str, Tensor]:
        """The six weights, detached, for logging: tau_local, tau_global, w_rbf, w_polynomial,
        w_spectral, w_mahalanobis."""
        w = self.log_weights().detach().exp()
        return {
            "tau_local": w[0, 0], "tau_global": w[0, 1],
            "w_rbf": w[1, 0], "w_polynomial": w[1, 1],
            "w_spectral": w[2, 0], "w_mahalanobis": w[2, 1],
        }

    def entropy(self) -> Tensor:
        """Sum of the three softmaxes' entropies (3 log 2 at uniform weights). The clamp makes
        a zero weight contribute exactly 0 with a finite gradient, where 0 * log 0 is NaN."""
        log_w = self.log_weights()
        return -(log_w.exp() * log_w.clamp_min(-1e4)).sum()

    def fit(self, embeddings: Tensor) -> HierarchicalMixtureKernel:
        for component in (self.rbf, self.polynomial, self.spectral, self.mahalanobis):
            component.fit(embeddings)
        return self

    def log_kernel(self, a: Tensor, b: Tensor) -> Tensor:
        log_w = self.log_weights().to(a.dtype)
        log_tau, log_local, log_global = log_w[0], log_w[1], log_w[2]
        terms = torch.stack([
            log_tau[0] + log_local[0] + self.rbf(a, b),
            log_tau[0] + log_local[1] + self.polynomial(a, b),
            log_tau[1] + log_global[0] + self.spectral(a, b),
            log_tau[1] + log_global[1] + self.mahalanobis(a, b),
        ], dim=-1)
        return terms.logsumexp(-1)
