"""The protocol every kernel follows: `forward(a, b)` returns log K(a, b) row by row.

Kernels return log K, never K, because the hybrid loss uses log K(x, w) - log K(x, l): computed
in log space that difference never divides by zero and never overflows, even when K itself
would underflow to 0.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn


class Kernel(nn.Module):
    """Base of every kernel. Subclasses implement `log_kernel(a, b)`; `forward` checks the
    inputs once for all of them.

    `fit(embeddings)` is called once, before training, with the dataset's embeddings (N, d);
    data-dependent kernels (Mahalanobis, spectral eigen form) override it, the others ignore it.
    """

    name: str = "?"
    # Whether the selection rule ranks this kernel as a candidate of the kernel-divergence
    # search (a learned mixture of the others is trained, not chosen).
    candidate: ClassVar[bool] = True

    @classmethod
    def fits_data(cls, **params) -> bool:
        """True when `fit(embeddings)` adapts a kernel built with `params` to the data, so the
        trainer must hand it the training responses' embeddings."""
        return False

    @property
    def label(self) -> str:
        return f"{type(self).name} kernel"

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """log K(a[i], b[i]) for each row i: a, b (B, d) -> (B,).

        Computed in at least float32 (bfloat16 embeddings are promoted) because squared
        distances of unnormalised embeddings lose all precision in 8 mantissa bits.
        """
        if a.dim() != 2 or a.shape != b.shape:
            raise ValueError(
                f"{self.label}: expected two (B, d) tensors of the same shape, "
                f"got {tuple(a.shape)} and {tuple(b.shape)}"
            )
        dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
        return self.log_kernel(a.to(dtype), b.to(dtype))

    def log_kernel(self, a: Tensor, b: Tensor) -> Tensor:
        raise NotImplementedError

    def fit(self, embeddings: Tensor) -> Kernel:
        """Adapt to the dataset's embeddings (N, d); a no-op for kernels that need no data."""
        return self

    # Parameters that are either trained or fixed, chosen by a `learnable` flag.

    def register_value(self, name: str, value: Tensor | None, learnable: bool) -> None:
        """Register `value` as an `nn.Parameter` (learnable) or a buffer (fixed) under `name`.

        `None` reserves the name for a value whose shape is known only later (from the data);
        `assign_value` fills it and `load_state_dict` can restore it into a fresh instance.
        """
        if value is None:
            if learnable:
                self.register_parameter(name, None)
            else:
                self.register_buffer(name, None)
            self._lazy = {**getattr(self, "_lazy", {}), name: learnable}
        elif learnable:
            self.register_parameter(name, nn.Parameter(value.detach().clone()))
        else:
            self.register_buffer(name, value.detach().clone())

    def register_positive(self, name: str, value: float | Tensor, learnable: bool) -> None:
        """Store a positive `value` as `log_<name>`: in log space no gradient step can make it
        zero or negative."""
        log_value = torch.as_tensor(value, dtype=torch.get_default_dtype()).log()
        self.register_value(f"log_{name}", log_value, learnable)

    def assign_value(self, name: str, value: Tensor) -> None:
        """Set a registered value. An existing parameter of the same shape is overwritten in
        place, so an optimizer built before this call keeps training it."""
        current = getattr(self, name)
        value = value.detach()
        if isinstance(current, nn.Parameter):
            if current.shape != value.shape:
                raise ValueError(
                    f"{self.label}: {name} has shape {tuple(current.shape)}, the data needs "
                    f"{tuple(value.shape)}; an optimizer may already hold the old parameter, "
                    "so build the kernel with the data's dimension"
                )
            with torch.no_grad():
                current.copy_(value)
        elif current is not None:
            setattr(self, name, value.to(device=current.device, dtype=current.dtype).clone())
        elif self._lazy[name]:
            setattr(self, name, nn.Parameter(value.to(torch.get_default_dtype()).clone()))
        else:
            setattr(self, name, value.to(torch.get_default_dtype()).clone())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A value created lazily by fit() is absent from a fresh instance: make room for it,
        # so a fitted kernel's checkpoint loads into a kernel that has not seen the data.
        for name in getattr(self, "_lazy", {}):
            key = prefix + name
            if getattr(self, name) is None and key in state_dict:
                self.assign_value(name, torch.empty_like(state_dict[key]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def squared_distance(a: Tensor, b: Tensor) -> Tensor:
    """|a - b|^2 per row. Not `norm()**2`: the norm's gradient is NaN at a == b."""
    return (a - b).pow(2).sum(-1)
