"""Name -> class registries, so losses, divergences, kernels, priors and schedules are chosen by
name from YAML and every member lives in its own file (the shape of Optuna's samplers)."""

from __future__ import annotations

import inspect
from typing import Any


class Registry(dict):
    """A dict of name -> class that builds members by name with checked keyword parameters."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str):
        def decorate(cls):
            if name in self:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            cls.name = name
            self[name] = cls
            return cls

        return decorate

    def get_class(self, name: str):
        if name not in self:
            raise ValueError(
                f"unknown {self.kind} {name!r}; expected one of: {', '.join(sorted(self))}"
            )
        return self[name]

    def parameters(self, name: str) -> dict[str, Any]:
        """The keyword parameters `name` accepts, with their defaults (inspect.Parameter.empty
        where there is none)."""
        sig = inspect.signature(self.get_class(name).__init__)
        named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        return {
            p.name: p.default
            for p in sig.parameters.values()
            if p.name != "self" and p.kind in named
        }

    def create(self, name: str, **params):
        cls = self.get_class(name)
        sig = inspect.signature(cls.__init__)
        takes_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
        if not takes_any:
            allowed = self.parameters(name)
            unknown = sorted(set(params) - set(allowed))
            if unknown:
                raise ValueError(
                    f"{self.kind} {name!r} has no parameter {', '.join(map(repr, unknown))}; "
                    f"its parameters are: {', '.join(allowed) or '(none)'}"
                )
        return cls(**params)


def check_positive(owner: str, name: str, value: float) -> float:
    if not value > 0:
        raise ValueError(f"{owner}: {name} must be > 0, got {value!r}")
    return float(value)


def check_range(owner: str, name: str, value: float, low: float, high: float,
                low_open: bool = False, high_open: bool = False) -> float:
    ok_low = value > low if low_open else value >= low
    ok_high = value < high if high_open else value <= high
    if not (ok_low and ok_high):
        lb = "(" if low_open else "["
        hb = ")" if high_open else "]"
        raise ValueError(f"{owner}: {name} must be in {lb}{low}, {high}{hb}, got {value!r}")
    return float(value)


LOSSES = Registry("loss")
DIVERGENCES = Registry("divergence")
KERNELS = Registry("kernel")
PRIORS = Registry("prior")
SCHEDULES = Registry("beta schedule")
