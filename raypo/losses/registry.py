"""Name -> class registries, so losses, divergences, kernels, priors and schedules are chosen by
name from YAML (the shape of Optuna's samplers); a member registers itself where it is defined,
so the registries, not any list elsewhere, say what exists."""

from __future__ import annotations

import inspect
from typing import Any


class Registry(dict):
    """A dict of name -> class that builds members by name with checked keyword parameters.

    A member class may also declare `options`, {name: default}: keywords every member of that
    class takes besides its own `__init__` parameters (the loss modifiers WPO and LD-DPO, which
    live once in raypo.losses.modifiers rather than in every loss's signature). `create` hands
    those given to the built member's `set_options(**given)`.
    """

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

    def options(self, name: str) -> dict[str, Any]:
        """The options `name` takes besides its own parameters, with their defaults."""
        return dict(getattr(self.get_class(name), "options", {}))

    def split(self, name: str, params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(own parameters, options) of `params` for member `name`."""
        options = self.options(name)
        return ({k: v for k, v in params.items() if k not in options},
                {k: v for k, v in params.items() if k in options})

    def parameters(self, name: str) -> dict[str, Any]:
        """The keyword parameters `name` accepts, with their defaults (inspect.Parameter.empty
        where there is none), its options included."""
        sig = inspect.signature(self.get_class(name).__init__)
        named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        own = {
            p.name: p.default
            for p in sig.parameters.values()
            if p.name != "self" and p.kind in named
        }
        return {**own, **self.options(name)}

    def create(self, name: str, **params):
        cls = self.get_class(name)
        params, options = self.split(name, params)
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
        member = cls(**params)
        if options:
            member.set_options(**options)
        return member


def check_positive(owner: str, name: str, value: float) -> float:
    if not value > 0:
        raise ValueError(f"{owner}: {name} must be > 0, got {value!r}")
    return float(value)


def check_nonnegative(owner: str, name: str, value: float) -> float:
    if not value >= 0:
        raise ValueError(f"{owner}: {name} must be >= 0, got {value!r}")
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
