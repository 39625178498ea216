"""A weighted sum of registered losses: TRL's `loss_type` list with `loss_weights`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from raypo.losses.base import REWARD_METRICS, PreferenceLoss, declared_needs
from raypo.losses.batch import PreferenceBatch
from raypo.losses.describe import Needs, own_parameters
from raypo.losses.registry import LOSSES

# MPO (Wang et al. 2024, arXiv 2411.10442) with the weights TRL's documentation gives for it.
MPO = ({"name": "dpo", "weight": 0.8}, {"name": "bco_pair", "weight": 0.2},
       {"name": "sft", "weight": 1.0})


def parse_terms(terms: Any) -> list[tuple[str, float, dict[str, Any]]]:
    """(name, weight, parameters) of each term, or a ValueError naming the term at fault."""
    expected = "a list of {name: <loss>, weight: <number >= 0>, <its parameters>...}"
    if isinstance(terms, str | bytes | Mapping) or not isinstance(terms, list | tuple):
        raise ValueError(f"mixture: terms must be {expected}, got {terms!r}")
    if not terms:
        raise ValueError(f"mixture: terms is empty; expected {expected}")
    parsed = []
    for i, term in enumerate(terms):
        where = f"mixture: terms[{i}]"
        if not isinstance(term, Mapping):
            raise ValueError(f"{where}: expected {{name: <loss>, weight: <number >= 0>, ...}}, "
                             f"got {term!r}")
        params = dict(term)
        name = params.pop("name", None)
        if not isinstance(name, str):
            raise ValueError(f"{where}: name (a registered loss) is missing")
        where = f"{where} ({name})"
        if name == "mixture":
            raise ValueError(f"{where}: a mixture cannot be a term of a mixture; list its terms "
                             "in this one")
        try:
            LOSSES.get_class(name)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        if "weight" not in params:
            raise ValueError(f"{where}: weight is missing (a number >= 0)")
        weight = params.pop("weight")
        if (isinstance(weight, bool) or not isinstance(weight, int | float)
                or not math.isfinite(weight) or weight < 0):
            raise ValueError(f"{where}: weight must be a finite number >= 0, got {weight!r}")
        parsed.append((name, float(weight), params))
    return parsed


def _labels(names: list[str]) -> list[str]:
    """Each term's metric prefix: its name, with its index where a name repeats."""
    return [f"{n}{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


@LOSSES.register("mixture")
class Mixture(PreferenceLoss):
    """A weighted mixture of losses: `sum_i weight_i * L_i`, L_i the batch loss of term i (the
    mean of its pair losses), as TRL sums its `loss_type` list with `loss_weights`.

    `terms` lists {name, weight, parameters...}: any registered loss but a mixture, each with
    its own parameters (`{name: bco_pair, weight: 0.2, beta: 0.2}`), modifiers included (WPO,
    LD-DPO: set `use_weighting`/`ld_alpha` on each term they should reach; TRL's global flags
    are the same value on every term). A weight of 0 computes a term and adds nothing (an
    ablation). The default is MPO (Wang et al. 2024, "Enhancing the Reasoning Ability of
    Multimodal Large Language Models via Mixed Preference Optimization", arXiv 2411.10442):
    dpo, bco_pair and sft weighted 0.8, 0.2, 1.0 as in TRL's documentation; RPO (arXiv
    2404.19733) is dpo plus rpo_alpha times sft.

    The rewards and reward metrics it logs are its first term's (put the term to read first);
    each term's batch loss is logged as `<name>_loss` and its own metrics as `<name>_<metric>`
    (the name with its index where names repeat). beta is that of the first term that takes a
    beta (a term without one, sft, is left alone); a beta schedule scales every such term's
    beta by the same factor (schedule value / first term's initial beta), so terms that start
    with one beta share the schedule's value and the ratios between different betas are kept.
    `on_step_end` reaches every term (adaptive ones update their beta), and the mixture's beta
    then follows its first term's.

    Formula and paper: docs/losses.md#loss-mixture
    """

    family = "mixture"

    def __init__(self, terms: list[dict[str, Any]] | None = None):
        parsed = parse_terms(list(MPO) if terms is None else terms)
        built = []
        for i, (name, _, params) in enumerate(parsed):
            try:
                built.append(LOSSES.create(name, **params))
            except (TypeError, ValueError) as error:
                raise ValueError(f"mixture: terms[{i}] ({name}): {error}") from None
        # the terms that take a beta, with the beta each starts from
        initial = {i: float(t.beta) for i, t in enumerate(built)
                   if "beta" in own_parameters(type(t))}
        lead = next(iter(initial), None)
        super().__init__(initial.get(lead, 0.1))
        self._initial_betas, self._lead = initial, lead
        self.terms = nn.ModuleList(built)
        self.weights = [w for _, w, _ in parsed]
        self.labels = _labels([n for n, _, _ in parsed])
        self.requires = frozenset().union(*(t.requires for t in built))
        self.full_reference_logits = any(t.full_reference_logits for t in built)

    @classmethod
    def needs(cls, terms: list[dict[str, Any]] | None = None) -> Needs:
        total = Needs(frozenset())
        for i, (name, _, params) in enumerate(parse_terms(list(MPO) if terms is None
                                                          else terms)):
            try:
                total = total | declared_needs(name, params)
            except (TypeError, ValueError) as error:
                raise ValueError(f"mixture: terms[{i}] ({name}): {error}") from None
        return total

    @classmethod
    def identity(cls, terms: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        names = [n for n, _, _ in parse_terms(list(MPO) if terms is None else terms)]
        return {**super().identity(), "terms": "+".join(names)}

    def set_beta(self, value: float) -> None:
        super().set_beta(value)
        if self._lead is not None:
            factor = float(value) / self._initial_betas[self._lead]
            for i, initial in self._initial_betas.items():
                self.terms[i].set_beta(initial * factor)

    def on_step_end(self) -> None:
        for term in self.terms:
            term.on_step_end()
        if self._lead is not None:
            self.beta.copy_(self.terms[self._lead].beta)

    def fit(self, embeddings: Tensor) -> Mixture:
        """Fit every term with data-dependent parts (a kernel's covariance)."""
        for term in self.terms:
            if hasattr(term, "fit"):
                term.fit(embeddings)
        return self

    def forward(self, batch: PreferenceBatch):
        batch.check(self.requires, self.name)
        outs = [term(batch) for term in self.terms]
        loss = sum(w * out.loss for w, out in zip(self.weights, outs, strict=True))
        metrics: dict[str, Tensor] = {}
        for i, (label, out) in enumerate(zip(self.labels, outs, strict=True)):
            metrics[f"{label}_loss"] = out.loss.detach()
            for key, value in out.metrics.items():
                if key not in REWARD_METRICS and (key != "beta" or i in self._initial_betas):
                    metrics[f"{label}_{key}"] = value
        first = outs[0]
        return self.output(batch, loss, metrics, (first.chosen_rewards, first.rejected_rewards))
