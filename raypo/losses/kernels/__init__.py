"""Kernels on embedding vectors for the hybrid loss of DPO-Kernels (arXiv 2501.03271).

Every kernel is an `nn.Module` whose `forward(a, b)` takes two (B, d) tensors and returns
log K(a, b), shape (B,). Build one by name with `kernel("rbf", sigma=0.5)`; call `fit(embeddings)`
once on the dataset's embeddings before training (data-dependent kernels need it, the others
ignore it) and before building the optimizer (it may create learnable parameters).
"""

from raypo.losses.kernels import basic, mahalanobis, mixture, spectral  # noqa: F401  (register)
from raypo.losses.kernels.base import Kernel
from raypo.losses.kernels.basic import PolynomialKernel, RBFKernel
from raypo.losses.kernels.mahalanobis import (
    MahalanobisKernel,
    ledoit_wolf_shrinkage,
    shrunk_covariance,
)
from raypo.losses.kernels.mixture import HierarchicalMixtureKernel
from raypo.losses.kernels.spectral import SpectralKernel
from raypo.losses.registry import KERNELS

kernel = KERNELS.create

__all__ = [
    "KERNELS",
    "HierarchicalMixtureKernel",
    "Kernel",
    "MahalanobisKernel",
    "PolynomialKernel",
    "RBFKernel",
    "SpectralKernel",
    "kernel",
    "ledoit_wolf_shrinkage",
    "shrunk_covariance",
]
