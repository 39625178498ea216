"""Spectral kernel of DPO-Kernels: a mixture of RBF scales, or the data covariance's
eigenfunctions."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from raypo.losses.kernels.base import Kernel, squared_distance
from raypo.losses.registry import KERNELS, check_positive

FORMS = ("mixture", "eigen")


@KERNELS.register("spectral")
class SpectralKernel(Kernel):
    """Spectral kernel (DPO-Kernels, arXiv 2501.03271), in one of two forms.

    `form="mixture"`: `K(a, b) = sum_k lambda_k exp(-alpha_k |a - b|^2)`, a mixture of scales
    alpha_k with weights lambda_k normalised to sum 1, so K(a, a) = 1. Computed as
    `log K = logsumexp_k(log lambda_k - alpha_k |a - b|^2)`.

    `form="eigen"`: the paper's eigenfunction form `sum_i lambda_i phi_i(a) phi_i(b)`, with
    phi_i(x) = u_i.x the projection on the i-th eigenvector of the embeddings' covariance
    (`fit()` keeps the top `rank` eigenpairs, lambda normalised to sum 1; before `fit()`,
    U = I and lambda is uniform). That sum can be negative, where log K is undefined, so this
    project's reading uses its exponential,
        K(a, b) = exp(sum_i lambda_i (u_i.a)(u_i.b) / temperature),
    which is positive definite: the exponent is a PD (linear) kernel, and exp of a PD kernel is
    PD (its Taylor series is a sum of Schur products of PD kernels with positive coefficients).
    Hence `log K = sum_i lambda_i (u_i.a)(u_i.b) / temperature`.

    Args:
        form: "mixture" (default) or "eigen".
        scales: mixture only: the alpha_k > 0, default (0.1, 1.0, 10.0).
        weights: mixture only: lambda_k >= 0 (normalised to sum 1), default uniform.
        rank: eigen only: how many eigenpairs to keep, default 16.
        temperature: eigen only: > 0, default 1.
        learnable: mixture only: train lambda (softmax of logits) and alpha (as log alpha).

    Formula and paper: docs/losses.md#kernel-spectral
    """

    def __init__(self, form: str = "mixture", scales: Sequence[float] = (0.1, 1.0, 10.0),
                 weights: Sequence[float] | None = None, rank: int = 16,
                 temperature: float = 1.0, learnable: bool = False):
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"{self.label}: form must be one of {FORMS}, got {form!r}")
        self.form = form
        self.learnable = learnable
        if form == "eigen":
            if learnable:
                raise ValueError(f"{self.label}: learnable=True is supported for "
                                 "form='mixture' only (the eigen form is fitted from data)")
            if not (isinstance(rank, int) and rank > 0):
                raise ValueError(f"{self.label}: rank must be a positive int, got {rank!r}")
            self.rank = rank
            self.temperature = check_positive(self.label, "temperature", temperature)
            self.register_value("eigenvectors", None, learnable=False)
            self.register_value("eigenvalues", None, learnable=False)
            return
        scales = [check_positive(self.label, "scales", s) for s in scales]
        if not scales:
            raise ValueError(f"{self.label}: scales must not be empty")
        if weights is None:
            weights = [1.0] * len(scales)
        weights = [float(w) for w in weights]
        if len(weights) != len(scales) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"{self.label}: weights must be {len(scales)} values >= 0 (one per "
                             f"scale) with a positive sum, got {weights!r}")
        self.register_positive("scales", torch.tensor(scales), learnable)
        # Unnormalised log-weights: log_softmax normalises them, and zero weights stay -inf.
        self.register_value("weight_logits", torch.tensor(weights).log(), learnable)

    @classmethod
    def fits_data(cls, form: str = "mixture", **params) -> bool:
        return form == "eigen"

    def fit(self, embeddings: Tensor) -> SpectralKernel:
        if self.form != "eigen":
            return self
        if embeddings.dim() != 2 or embeddings.shape[0] < 2:
            raise ValueError(f"{self.label}: fit needs embeddings (N >= 2, d), "
                             f"got {tuple(embeddings.shape)}")
        x = embeddings.detach().double()
        x = x - x.mean(0)
        values, vectors = torch.linalg.eigh(x.T @ x / x.shape[0])  # ascending
        keep = min(self.rank, values.shape[0])
        values, vectors = values.flip(0)[:keep].clamp_min(0), vectors.flip(1)[:, :keep]
        if values.sum() <= 0:
            raise ValueError(f"{self.label}: the embeddings have zero variance (all identical)")
        self.assign_value("eigenvectors", vectors.to(embeddings.device))
        self.assign_value("eigenvalues", (values / values.sum()).to(embeddings.device))
        return self

    def log_kernel(self, a: Tensor, b: Tensor) -> Tensor:
        if self.form == "eigen":
            if self.eigenvectors is None:  # U = I, lambda = 1/d
                return (a * b).sum(-1) / (a.shape[1] * self.temperature)
            if self.eigenvectors.shape[0] != a.shape[1]:
                raise ValueError(f"{self.label}: fitted for dimension "
                                 f"{self.eigenvectors.shape[0]}, got inputs of dimension "
                                 f"{a.shape[1]}")
            u = self.eigenvectors.to(a.dtype)
            lam = self.eigenvalues.to(a.dtype)
            return ((a @ u) * (b @ u) * lam).sum(-1) / self.temperature
        log_weights = self.weight_logits.log_softmax(-1).to(a.dtype)
        alphas = self.log_scales.exp().to(a.dtype)
        terms = log_weights - alphas * squared_distance(a, b)[:, None]
        return terms.logsumexp(-1)
