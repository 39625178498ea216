"""Mahalanobis kernel, with a Ledoit-Wolf shrinkage estimate of the embeddings' covariance."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from raypo.losses.kernels.base import Kernel
from raypo.losses.registry import KERNELS, check_range


def ledoit_wolf_shrinkage(x: Tensor) -> Tensor:
    """Ledoit-Wolf optimal shrinkage intensity of the covariance of `x` (N, d) toward mu*I.

    With X centred, S = X^T X / N the empirical covariance and mu = tr(S) / d (Ledoit & Wolf,
    "A well-conditioned estimator for large-dimensional covariance matrices", 2004; the same
    estimate as `sklearn.covariance.ledoit_wolf`):
        delta^2 = |S - mu I|_F^2 / d                          (distance of S to the target)
        beta^2  = 1/(d N^2) sum_k |x_k x_k^T - S|_F^2         (variance of S's entries)
                = (sum_k |x_k|^4 / N - |S|_F^2) / (d N)
        shrinkage = min(beta^2, delta^2) / delta^2  in [0, 1]   (0 when S is already mu I).
    """
    x = x - x.mean(0)
    n, d = x.shape
    s = x.T @ x / n
    mu = s.diagonal().sum() / d
    delta = ((s - mu * torch.eye(d, dtype=x.dtype, device=x.device)) ** 2).sum() / d
    beta = (x.pow(2).sum(1).pow(2).sum() / n - s.pow(2).sum()) / (d * n)
    if delta <= 0:
        return torch.zeros((), dtype=x.dtype, device=x.device)
    return (beta.clamp(min=0) / delta).clamp(max=1)


def shrunk_covariance(x: Tensor, shrinkage: float | None = None) -> tuple[Tensor, float]:
    """(1 - s) S + s mu I for the empirical covariance S of `x` (N, d), with s the given
    `shrinkage` or, when None, the Ledoit-Wolf intensity. Returns the matrix and s."""
    xc = x - x.mean(0)
    s_emp = xc.T @ xc / x.shape[0]
    mu = s_emp.diagonal().mean()
    s = float(ledoit_wolf_shrinkage(x)) if shrinkage is None else float(shrinkage)
    eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    return (1 - s) * s_emp + s * mu * eye, s


@KERNELS.register("mahalanobis")
class MahalanobisKernel(Kernel):
    """Mahalanobis kernel `K(a, b) = exp(-(a - b)^T S^-1 (a - b) / 2)` (DPO-Kernels,
    arXiv 2501.03271), so log K(a, a) = 0.

    The precision is kept as its Cholesky factor, S^-1 = L L^T with L lower-triangular, so
    `log K = -|L^T (a - b)|^2 / 2` needs no inverse at training time. L's diagonal is stored in
    log space: any L built from the stored values is invertible, so S^-1 stays positive
    definite under any gradient step (the upper triangle of the stored matrix is unused).

    S is the identity until `fit(embeddings)` sets it to a shrinkage estimate of the
    embeddings' covariance (Ledoit-Wolf toward mu*I, or the given `shrinkage`).

    Args:
        dim: embedding size d. With None the matrix is created on the first `fit()` (or, as the
            identity, on the first `forward()`). A learnable matrix must exist before the
            optimizer is built: pass `dim=` or call `fit()` first.
        shrinkage: None for Ledoit-Wolf, or a fixed intensity in [0, 1] (0: the empirical
            covariance, which must then be non-singular).
        learnable: train L, starting from the identity or from the fitted precision.

    Formula and paper: docs/losses.md#kernel-mahalanobis
    """

    def __init__(self, dim: int | None = None, shrinkage: float | None = None,
                 learnable: bool = False):
        super().__init__()
        if dim is not None and not (isinstance(dim, int) and dim > 0):
            raise ValueError(f"{self.label}: dim must be a positive int or None, got {dim!r}")
        if shrinkage is not None:
            shrinkage = check_range(self.label, "shrinkage", shrinkage, 0.0, 1.0)
        self.shrinkage = shrinkage
        self.learnable = learnable
        self.fitted_shrinkage: float | None = None
        # Zeros encode L = I: the diagonal entries are log L_ii.
        raw = None if dim is None else torch.zeros(dim, dim)
        self.register_value("raw_factor", raw, learnable)

    @classmethod
    def fits_data(cls, **params) -> bool:
        return True

    def on_bind(self, facts) -> None:
        """Create the matrix at the embeddings' size, so a learnable one is in the optimizer."""
        if self.raw_factor is None:
            self.assign_value("raw_factor", torch.zeros(facts.embedding_dim, facts.embedding_dim))

    def precision_factor(self) -> Tensor:
        """L, lower-triangular with a positive diagonal, such that S^-1 = L L^T."""
        raw = self.raw_factor
        return torch.tril(raw, -1) + torch.diag_embed(raw.diagonal().exp())

    def precision(self) -> Tensor:
        factor = self.precision_factor()
        return factor @ factor.T

    def fit(self, embeddings: Tensor) -> MahalanobisKernel:
        if embeddings.dim() != 2 or embeddings.shape[0] < 2:
            raise ValueError(f"{self.label}: fit needs embeddings (N >= 2, d), "
                             f"got {tuple(embeddings.shape)}")
        # float64: the two Cholesky factorisations below square the condition number.
        cov, self.fitted_shrinkage = shrunk_covariance(embeddings.detach().double(),
                                                       self.shrinkage)
        chol, info = torch.linalg.cholesky_ex(cov)
        if info == 0:
            factor, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol))
        if info != 0:
            raise ValueError(
                f"{self.label}: the embeddings' covariance (shrinkage={self.fitted_shrinkage}) "
                "is singular; use shrinkage=None (Ledoit-Wolf) or a value > 0, and embeddings "
                "that are not all identical"
            )
        raw = torch.tril(factor, -1) + torch.diag_embed(factor.diagonal().log())
        self.assign_value("raw_factor", raw.to(embeddings.device))
        return self

    def log_kernel(self, a: Tensor, b: Tensor) -> Tensor:
        diff = a - b
        if self.raw_factor is None:
            if not self.learnable:
                return -0.5 * diff.pow(2).sum(-1)  # S = I, without fixing the dimension yet
            warnings.warn(
                f"{self.label}: the learnable matrix is created in the first forward(); an "
                "optimizer built earlier does not train it. Pass dim= or call fit() first.",
                stacklevel=2,
            )
            self.assign_value("raw_factor", torch.zeros(a.shape[1], a.shape[1]).to(a.device))
        if self.raw_factor.shape[0] != a.shape[1]:
            raise ValueError(f"{self.label}: built for dimension {self.raw_factor.shape[0]}, "
                             f"got inputs of dimension {a.shape[1]}")
        return -0.5 * (diff @ self.precision_factor().to(a.dtype)).pow(2).sum(-1)
