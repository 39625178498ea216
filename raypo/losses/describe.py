"""What a registry member says about itself, so that the trainer, the search, the selection and
the reports ask it instead of branching on its name.

- `Needs`: the batch fields a loss reads and the reference outputs behind them, known from the
  class and its parameters before it is built (`LOSSES.get_class(name).needs(**params)`).
- `ModelFacts` and `bind`: what only the model knows (hidden size, embedding size, the output
  embeddings), handed to a built loss and every component inside it before the optimizer is
  made (`loss_fn.bind(facts)`); a component that needs a fact defines `on_bind(facts)`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn


@dataclass(frozen=True)
class Needs:
    """What a loss reads.

    fields: the `PreferenceBatch` fields (the loss's `requires`).
    full_reference_logits: full-vocabulary reference logits, computed live by the reference at
        every step (a top-k cache will not do).
    fitted_embeddings: the loss fits a data-dependent part (a kernel's covariance) on the
        reference embeddings of the training responses, whatever embeddings it trains on.
    """

    fields: frozenset[str]
    full_reference_logits: bool = False
    fitted_embeddings: bool = False

    def __or__(self, other: Needs) -> Needs:
        return Needs(self.fields | other.fields,
                     self.full_reference_logits or other.full_reference_logits,
                     self.fitted_embeddings or other.fitted_embeddings)


@dataclass(frozen=True)
class ModelFacts:
    """What the trained model tells a loss once it is loaded.

    hidden_size: the model's last hidden state size (SparsePO's mask head reads it).
    embedding_dim: the size of the prompt/response embeddings a kernel compares (the hidden
        size, or an encoder's).
    vocab_size: the output vocabulary.
    token_embeddings: (V, d) output embeddings, detached (a transport cost between tokens).
    """

    hidden_size: int
    embedding_dim: int
    vocab_size: int
    token_embeddings: Tensor | None = None


def bind(module: nn.Module, facts: ModelFacts) -> None:
    """Call `on_bind(facts)` on `module` and every submodule that defines it."""
    for member in module.modules():
        hook = getattr(member, "on_bind", None)
        if hook is not None:
            hook(facts)


def default_of(cls: type, parameter: str) -> Any:
    """The default of `cls.__init__`'s `parameter` (inspect.Parameter.empty if none)."""
    param = inspect.signature(cls.__init__).parameters.get(parameter)
    return inspect.Parameter.empty if param is None else param.default


def own_parameters(cls: type) -> set[str]:
    """The named parameters of `cls.__init__` (not its **params pass-through)."""
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name for p in inspect.signature(cls.__init__).parameters.values()
            if p.name != "self" and p.kind in named}
