"""The two local kernels of DPO-Kernels (arXiv 2501.03271): polynomial and RBF."""

from __future__ import annotations

import torch
from torch import Tensor

from raypo.losses.kernels.base import Kernel, squared_distance
from raypo.losses.registry import KERNELS, check_positive


@KERNELS.register("polynomial")
class PolynomialKernel(Kernel):
    """Polynomial kernel `K(a, b) = (a.b + c)^d` (DPO-Kernels, arXiv 2501.03271).

    `log K = d * log|a.b + c|`, exact for an even integer d (then K = |a.b + c|^d). For any
    other d, K is negative or undefined where a.b + c < 0, and the log of a non-positive kernel
    value is undefined: the base is then floored at `floor`, read as "as dissimilar as it gets".
    The even case is floored too, where a.b + c is 0, so log K stays finite with a finite
    gradient.

    Args:
        degree: d > 0, default 2 (the paper's scripts).
        c: offset >= 0, default 1 (the paper's scripts); > 0 when learnable.
        learnable: train c (stored as log c); the degree always stays fixed.

    Formula and paper: docs/losses.md#kernel-polynomial
    """

    floor = 1e-12

    def __init__(self, degree: float = 2, c: float = 1.0, learnable: bool = False):
        super().__init__()
        self.degree = check_positive(self.label, "degree", degree)
        if not c >= 0:
            raise ValueError(f"{self.label}: c must be >= 0, got {c!r}")
        if learnable and c == 0:
            raise ValueError(f"{self.label}: c must be > 0 when learnable (it is trained as log c)")
        self.even = self.degree.is_integer() and int(self.degree) % 2 == 0
        self.learnable = learnable
        if learnable:
            self.register_positive("c", c, learnable=True)
        else:
            self.register_buffer("c", torch.tensor(float(c)))

    def offset(self) -> Tensor:
        return self.log_c.exp() if self.learnable else self.c

    def log_kernel(self, a: Tensor, b: Tensor) -> Tensor:
        base = (a * b).sum(-1) + self.offset().to(a.dtype)
        if self.even:
            base = base.abs()
        return self.degree * base.clamp_min(self.floor).log()


@KERNELS.register("rbf")
class RBFKernel(Kernel):
    """Gaussian (RBF) kernel `K(a, b) = exp(-|a - b|^2 / (2 sigma^2))` (DPO-Kernels,
    arXiv 2501.03271), so `log K = -|a - b|^2 / (2 sigma^2)` and log K(a, a) = 0.

    Args:
        sigma: bandwidth > 0, default 1 (the paper's scripts).
        learnable: train sigma (stored as log sigma).

    Formula and paper: docs/losses.md#kernel-rbf
    """

    def __init__(self, sigma: float = 1.0, learnable: bool = False):
        super().__init__()
        self.register_positive("sigma", check_positive(self.label, "sigma", sigma), learnable)

    def log_kernel(self, a: Tensor, b: Tensor) -> Tensor:
        # 1 / (2 sigma^2) = exp(-2 log sigma) / 2, without a division by a tiny sigma.
        return -0.5 * squared_distance(a, b) * torch.exp(-2 * self.log_sigma.to(a.dtype))
