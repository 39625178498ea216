"""What a loss reads (`PreferenceBatch`) and what it returns (`LossOutput`).

Shapes: B preference pairs, T response positions (padded), V vocabulary, H hidden size,
D embedding size. Per-token fields are aligned with the response: position t holds the
distribution that predicts response token t, and `*_mask` is 1 on real response tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch
from torch import Tensor


class TopKLogits(NamedTuple):
    """A distribution kept only on its k most likely tokens.

    Full-vocabulary reference logits do not fit in memory for real models, so the trainer
    caches this form: `values` (..., k) are the top-k logits, `indices` (..., k) their token
    ids and `log_normalizer` (...) the logsumexp of the full logits, so that
    `values - log_normalizer[..., None]` are exact log-probabilities on the kept tokens.
    """

    values: Tensor
    indices: Tensor
    log_normalizer: Tensor

    @classmethod
    def from_logits(cls, logits: Tensor, k: int) -> TopKLogits:
        """Keep the top k. The values stored are log-probabilities (log_normalizer 0): the
        same distribution, and bit-for-bit what `log_softmax` of the full logits gives, so a
        divergence between a distribution and its own cache is exactly 0."""
        logp = logits.log_softmax(-1)
        values, indices = logp.topk(min(k, logits.shape[-1]), dim=-1)
        return cls(values, indices, torch.zeros_like(logp[..., 0]))

    @property
    def shape(self) -> torch.Size:
        """The shape of the full logits' leading dimensions plus k."""
        return self.values.shape

    def select(self, mask: Tensor) -> TopKLogits:
        """The positions where the boolean `mask` (shape of the leading dims) is true."""
        return TopKLogits(self.values[mask], self.indices[mask], self.log_normalizer[mask])

    def take(self, index) -> TopKLogits:
        """Positions `index` of the leading dimension (a slice of a flat (N, k) form)."""
        return TopKLogits(self.values[index], self.indices[index], self.log_normalizer[index])

    @classmethod
    def cat(cls, parts: list[TopKLogits]) -> TopKLogits:
        return cls(*(torch.cat(field) for field in zip(*parts, strict=True)))


Logits = Tensor | TopKLogits


class TokenTerm(Protocol):
    """A per-position function of the next-token distributions: `(policy_logits (..., V)
    float32, reference (..., V) logits or TopKLogits or None, labels (...), mask (...))` to
    values (...). A loss that reads per-position distributions declares its terms
    (`token_terms()`); the trainer evaluates them a chunk of positions at a time inside the
    chunked log-prob computation (raypo.train.forward), so no (B, T, V) tensor is ever
    whole, and hands the loss `*_token_terms`; given full logits instead, the loss evaluates
    the same function on them (raypo.losses.token.token_values)."""

    def __call__(self, policy_logits: Tensor, ref_logits: Logits | None, labels: Tensor,
                 mask: Tensor) -> Tensor: ...

# The sequence-level fields every reference-based loss reads.
SEQUENCE_FIELDS = frozenset(
    {
        "policy_chosen_logps",
        "policy_rejected_logps",
        "ref_chosen_logps",
        "ref_rejected_logps",
        "chosen_lengths",
        "rejected_lengths",
    }
)
POLICY_SEQUENCE_FIELDS = frozenset(
    {"policy_chosen_logps", "policy_rejected_logps", "chosen_lengths", "rejected_lengths"}
)
MASK_FIELDS = frozenset({"chosen_mask", "rejected_mask"})
POLICY_TOKEN_FIELDS = frozenset({"policy_chosen_token_logps", "policy_rejected_token_logps"})
REF_TOKEN_FIELDS = frozenset({"ref_chosen_token_logps", "ref_rejected_token_logps"})
LOG_SUM_SQ_FIELDS = frozenset({"policy_chosen_log_sum_sq_probs",
                               "policy_rejected_log_sum_sq_probs"})
LOGIT_FIELDS = frozenset(
    {"policy_chosen_logits", "policy_rejected_logits", "ref_chosen_logits", "ref_rejected_logits"}
)
EMBEDDING_FIELDS = frozenset({"prompt_embeddings", "chosen_embeddings", "rejected_embeddings"})
# The per-position terms a loss declares, evaluated in chunks by the trainer: they stand for
# the policy's logits (LOGIT_FIELDS' policy half) in a batch that has them.
TOKEN_TERM_FIELDS = frozenset({"chosen_token_terms", "rejected_token_terms"})

_FIELD_HELP = {
    "policy_chosen_logps": "(B,) policy log-prob of the chosen response, summed over its tokens",
    "policy_rejected_logps": "(B,) policy log-prob of the rejected response",
    "ref_chosen_logps": "(B,) reference log-prob of the chosen response",
    "ref_rejected_logps": "(B,) reference log-prob of the rejected response",
    "chosen_lengths": "(B,) number of chosen response tokens",
    "rejected_lengths": "(B,) number of rejected response tokens",
    "chosen_mask": "(B, T) 1 on real chosen response tokens",
    "rejected_mask": "(B, T) 1 on real rejected response tokens",
    "chosen_labels": "(B, T) token ids of the chosen response",
    "rejected_labels": "(B, T) token ids of the rejected response",
    "policy_chosen_token_logps": "(B, T) per-token policy log-probs of the chosen response",
    "policy_rejected_token_logps": "(B, T) per-token policy log-probs of the rejected response",
    "ref_chosen_token_logps": "(B, T) per-token reference log-probs of the chosen response",
    "ref_rejected_token_logps": "(B, T) per-token reference log-probs of the rejected response",
    "policy_chosen_log_sum_sq_probs": "(B, T) log sum_v p_v^2 of the policy's next-token "
                                      "distribution at each chosen response position (WPO)",
    "policy_rejected_log_sum_sq_probs": "(B, T) log sum_v p_v^2 of the policy at each rejected "
                                        "response position (WPO)",
    "policy_chosen_logits": "(B, T, V) policy logits at the chosen response positions",
    "policy_rejected_logits": "(B, T, V) policy logits at the rejected response positions",
    "ref_chosen_logits": "(B, T, V) reference logits (or TopKLogits) at chosen positions",
    "ref_rejected_logits": "(B, T, V) reference logits (or TopKLogits) at rejected positions",
    "ref_chosen_hidden": "(B, T, H) reference last hidden states at chosen positions",
    "ref_rejected_hidden": "(B, T, H) reference last hidden states at rejected positions",
    "chosen_token_terms": "name -> (B, T): the loss's per-position terms (TokenTerm) at the "
                          "chosen response positions",
    "rejected_token_terms": "name -> (B, T): the loss's per-position terms at the rejected "
                            "response positions",
    "prompt_embeddings": "(B, D) embedding of the prompt",
    "chosen_embeddings": "(B, D) embedding of the chosen response",
    "rejected_embeddings": "(B, D) embedding of the rejected response",
}


@dataclass
class PreferenceBatch:
    """Everything a preference loss may read for B pairs; a loss reads only its `requires`."""

    policy_chosen_logps: Tensor | None = None
    policy_rejected_logps: Tensor | None = None
    ref_chosen_logps: Tensor | None = None
    ref_rejected_logps: Tensor | None = None
    chosen_lengths: Tensor | None = None
    rejected_lengths: Tensor | None = None
    chosen_mask: Tensor | None = None
    rejected_mask: Tensor | None = None
    chosen_labels: Tensor | None = None
    rejected_labels: Tensor | None = None
    policy_chosen_token_logps: Tensor | None = None
    policy_rejected_token_logps: Tensor | None = None
    ref_chosen_token_logps: Tensor | None = None
    ref_rejected_token_logps: Tensor | None = None
    policy_chosen_log_sum_sq_probs: Tensor | None = None
    policy_rejected_log_sum_sq_probs: Tensor | None = None
    policy_chosen_logits: Tensor | None = None
    policy_rejected_logits: Tensor | None = None
    ref_chosen_logits: Logits | None = None
    ref_rejected_logits: Logits | None = None
    ref_chosen_hidden: Tensor | None = None
    ref_rejected_hidden: Tensor | None = None
    chosen_token_terms: dict[str, Tensor] | None = None
    rejected_token_terms: dict[str, Tensor] | None = None
    prompt_embeddings: Tensor | None = None
    chosen_embeddings: Tensor | None = None
    rejected_embeddings: Tensor | None = None

    @classmethod
    def describe(cls, name: str) -> str:
        return _FIELD_HELP[name]

    def check(self, requires: frozenset[str], loss: str) -> None:
        """Raise a ValueError naming every field `loss` needs that this batch lacks."""
        missing = sorted(n for n in requires if getattr(self, n) is None
                         and not self._stands_in(n))
        if missing:
            lines = "\n".join(f"  {n}: {_FIELD_HELP[n]}" for n in missing)
            raise ValueError(f"loss {loss!r} needs batch fields this batch lacks:\n{lines}")

    def _stands_in(self, name: str) -> bool:
        """A logits field (policy or reference) is not needed when its side's token terms,
        the only thing read from it, are given."""
        if name not in LOGIT_FIELDS:
            return False
        side = "chosen" if "_chosen_" in name else "rejected"
        return getattr(self, f"{side}_token_terms") is not None

    # The quantities most losses share, computed once here rather than in every loss.
    @property
    def chosen_logratios(self) -> Tensor:
        """h(y_w) = logp(y_w) - ref(y_w)."""
        return self.policy_chosen_logps - self.ref_chosen_logps

    @property
    def rejected_logratios(self) -> Tensor:
        """h(y_l) = logp(y_l) - ref(y_l)."""
        return self.policy_rejected_logps - self.ref_rejected_logps

    @property
    def margin(self) -> Tensor:
        """delta = h(y_w) - h(y_l)."""
        return self.chosen_logratios - self.rejected_logratios


@dataclass
class LossOutput:
    """A loss's answer: the batch-mean `loss`, per-pair rewards (B,) and detached metrics."""

    loss: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)
