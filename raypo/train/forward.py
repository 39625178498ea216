"""One forward over chosen and rejected concatenated, producing only what the loss reads.

The batch layout (raypo.data.collate): rows 0..B-1 chosen, B..2B-1 rejected, every prompt
ending and every response starting at column P, so that per-token outputs come out aligned
with `labels` (B, T). The model itself does not run on that layout: its width is the longest
prompt plus the longest response, about 1.6 times the real tokens on data of varied lengths.
Each row is shifted left to start at column 0 (right padding only, width = the longest
sequence, about 1.2 times the real tokens), which a causal model computes exactly as each row
alone without an attention mask (no real token attends to a later position); the outputs at
response positions are then gathered back into the aligned layout.

Log-probs in chunks (`token_outputs`): a model's logits at every response position are rows x
positions x vocabulary, 20 GB in float32 for 64 rows of 512 positions and Qwen's 151,936
tokens, and a log-softmax makes more copies of that. So the output projection is applied to
the last hidden states of the real response tokens only, `chunk` tokens at a time, and each
chunk keeps only what is read from it: the label's log-prob, the loss's per-position terms
(`TokenTerm`: divergences to the reference, perturbed log-probs), WPO's log sum p^2, the
reference's top-k. Under autograd a chunk's logits are freed after the forward and recomputed
in the backward pass, so at most one chunk's vocabulary-sized tensors are alive at a time
(what Liger's fused linear cross-entropy does in Triton, here in plain PyTorch for any
device). Three paths, by what is read and what the head is:
- a plain linear head and only log-probs (dpo and most losses; WPO's log sum p^2 too):
  `LinearLogProbs` (raypo.train.chunked_head), which takes the vocabulary in blocks as well
  and writes the logits' gradient in place, one buffer of chunk x block in all;
- a plain linear head and token terms: `LinearInChunks`, autograd on each recomputed chunk
  and the head's weight gradient accumulated in one buffer;
- any other head (LoRA on the head): a non-reentrant checkpoint per chunk.

The projection runs inside the model's own forward: the output head's `forward` is replaced,
for that one call, by the chunk loop, which returns the chunks' small results as the model's
"logits". DDP and FSDP therefore see an ordinary forward: FSDP has the root unit's parameters
(the head's weight) gathered while the chunks are computed and recomputed (the root keeps
them until its backward ends), and its pre-backward hooks sit on that output, which every
gradient passes through. A model that transforms its logits after the head (Gemma 2's
soft-capping) would transform those results: raypo refuses it rather than compute wrong
log-probs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from raypo.losses.batch import (
    EMBEDDING_FIELDS,
    LOG_SUM_SQ_FIELDS,
    LOGIT_FIELDS,
    TokenTerm,
    TopKLogits,
)
from raypo.train.chunked_head import LinearInChunks, LinearLogProbs

TOKEN_LOGP_FIELDS = frozenset({
    "policy_chosen_token_logps", "policy_rejected_token_logps",
    "ref_chosen_token_logps", "ref_rejected_token_logps",
})
HIDDEN_FIELDS = frozenset({"ref_chosen_hidden", "ref_rejected_hidden"})


DEFAULT_CHUNK = 512  # the config's `logits_chunk` default (raypo.train.config)


@dataclass
class TokenOutputs:
    """Per target token (flat, N): what `token_outputs` kept of each chunk's logits."""

    logps: Tensor  # (N,) log p(target)
    terms: dict[str, Tensor] = field(default_factory=dict)  # name -> (N,)
    log_sum_sq: Tensor | None = None  # (N,) log sum_v p_v^2, no gradient
    topk: TopKLogits | None = None  # (N, k) log-probs of the k most likely tokens
    hidden: Tensor | None = None  # (N, H) the last hidden states that predict the targets
    model_output: object = None  # the model's own output (hidden_states when asked)


class LiveReference:
    """Full-vocabulary reference logits made chunk by chunk: the reference's last hidden
    states at the target tokens (N, H), projected by its output head a chunk at a time."""

    def __init__(self, hidden: Tensor, head: Callable[[Tensor], Tensor]):
        self.hidden, self.head = hidden, head

    def take(self, index: slice) -> Tensor:
        with torch.no_grad():
            return self.head(self.hidden[index]).float()


def output_head(model: nn.Module) -> nn.Module:
    """The output projection (`get_output_embeddings()`) of `model`, seen through DDP, FSDP,
    peft and raypo's Reference wrappers."""
    seen = model
    for _ in range(8):
        get = getattr(seen, "get_output_embeddings", None)
        head = get() if callable(get) else None
        if head is not None:
            return head
        seen = getattr(seen, "module", None) or getattr(seen, "model", None)
        if seen is None:
            break
    raise TypeError(f"{type(model).__name__}: no output projection (get_output_embeddings) "
                    "to compute log-probs through")


@contextlib.contextmanager
def _head_replaced(head: nn.Module, forward):
    """`head`'s forward is `forward` inside the block (an instance attribute shadowing the
    class's method; the module tree, its parameters and its hooks stay as they are)."""
    head.forward = forward
    try:
        yield
    finally:
        del head.forward


def token_outputs(model, input_ids: Tensor, rows: Tensor, cols: Tensor, targets: Tensor, *,
                  chunk: int = DEFAULT_CHUNK, terms: dict[str, TokenTerm] | None = None,
                  reference=None, log_sum_sq: bool = False, topk: int | None = None,
                  hidden_only: bool = False, **model_kwargs) -> TokenOutputs:
    """Run `model` on `input_ids` (R, W) and keep, for each target n, what the distribution
    at row `rows[n]`, column `cols[n]` says about token `targets[n]`, in chunks of `chunk`
    targets (see the module's docstring). `reference` (for `terms`): the reference's logits
    at the same targets, a flat (N, k) TopKLogits or (N, V) tensor, or a LiveReference.
    `hidden_only`: keep the last hidden states at the targets and compute no logits (a
    reference's run for a LiveReference). `model_kwargs` go to the model's forward."""
    head = output_head(model)
    width = input_ids.shape[1]
    chunks = _Chunks(head, targets, chunk, terms or {}, reference, log_sum_sq, topk)
    result = {}

    def replaced(hidden):
        # a model may pass only its last columns (logits_to_keep) or all of them
        h = hidden[rows, cols - (width - hidden.shape[1])]  # (N, H)
        result["out"] = h if hidden_only else chunks(h)
        return result["out"]

    keep = width - int(cols.min()) if len(cols) else 1
    with _head_replaced(head, replaced):
        out = model(input_ids=input_ids, logits_to_keep=keep, **model_kwargs)
    if out.logits is not result.get("out"):
        raise NotImplementedError(
            f"{type(output_head(model)).__name__} of this model: its logits are transformed "
            "after the output projection (e.g. soft-capping), which raypo's chunked "
            "log-probs do not support yet")
    packed = result["out"]
    if hidden_only:
        return TokenOutputs(logps=packed.new_zeros(0), hidden=packed, model_output=out)
    return chunks.outputs(packed, out)


class _Chunks:
    """The output head applied to the targets' hidden states `chunk` at a time, keeping what
    is read (module docstring): `chunks(h)` is (N, 1 + len(terms)), the log-probs and the
    terms; `outputs` packs them, with the extras the first runs kept (WPO's log sum p^2, the
    top-k logits)."""

    def __init__(self, head: nn.Module, targets: Tensor, chunk: int,
                 terms: dict[str, TokenTerm], reference, log_sum_sq: bool, topk: int | None):
        self.head, self.project = head, head.forward  # its own forward, before it is replaced
        self.targets, self.chunk, self.terms, self.reference = targets, chunk, terms, reference
        self.log_sum_sq, self.topk = log_sum_sq, topk
        self.extras: dict = {}

    def values(self, logits: Tensor, part: slice, first_run: bool) -> Tensor:
        """(chunk, 1 + len(terms)): the targets' log-probs and the terms, from float32
        logits; the extras only on a chunk's first run (not when the backward recomputes)."""
        log_normalizer = torch.logsumexp(logits, -1)
        labels = self.targets[part]
        values = [logits.gather(-1, labels[:, None])[:, 0] - log_normalizer]
        if self.terms:
            ref = None if self.reference is None else self.reference.take(part)
            ones = torch.ones_like(labels, dtype=logits.dtype)
            values += [term(logits, ref, labels, ones).to(logits.dtype)
                       for term in self.terms.values()]
        if first_run:
            with torch.no_grad():
                if self.log_sum_sq:  # log sum_v p_v^2 = logsumexp(2 z) - 2 logsumexp(z)
                    self.extras.setdefault("log_sum_sq", []).append(
                        torch.logsumexp(2 * logits, -1) - 2 * log_normalizer)
                if self.topk is not None:
                    self.extras.setdefault("topk", []).append(
                        TopKLogits.from_logits(logits, self.topk))
        return torch.stack(values, -1)

    def __call__(self, h: Tensor) -> Tensor:
        head, chunk = self.head, self.chunk
        if not h.shape[0]:
            return h.new_zeros(0, 1 + len(self.terms))
        if type(head) is nn.Linear and not self.terms and self.topk is None:
            return LinearLogProbs.apply(h, head.weight, head.bias, self.targets, chunk,
                                        self.log_sum_sq, self.extras)[:, None]
        if not torch.is_grad_enabled():
            return torch.cat([self.values(self.project(h[start:start + chunk]).float(),
                                          slice(start, start + chunk), True)
                              for start in range(0, h.shape[0], chunk)])
        if type(head) is nn.Linear:
            return LinearInChunks.apply(h, head.weight, head.bias, chunk, self.values)
        return self.checkpointed(h)

    def checkpointed(self, h: Tensor) -> Tensor:
        """Any head (a LoRA-wrapped one too): each chunk a non-reentrant checkpoint."""
        runs: set[int] = set()

        def run(h_part, start):
            first = start not in runs
            runs.add(start)
            return self.values(self.project(h_part).float(),
                               slice(start, start + self.chunk), first)

        return torch.cat([checkpoint(run, h[start:start + self.chunk], start,
                                     use_reentrant=False)
                          for start in range(0, h.shape[0], self.chunk)])

    def outputs(self, packed: Tensor, model_output) -> TokenOutputs:
        outputs = TokenOutputs(logps=packed[:, 0], model_output=model_output,
                               terms={name: packed[:, 1 + k]
                                      for k, name in enumerate(self.terms)})
        if "log_sum_sq" in self.extras:
            outputs.log_sum_sq = torch.cat(self.extras["log_sum_sq"])
        if "topk" in self.extras:
            outputs.topk = TopKLogits.cat(self.extras["topk"])
        return outputs


@dataclass
class ForwardOutput:
    """Per-row (2B) results of one forward; fields a loss does not need stay None."""

    logps: Tensor  # (2B,) summed response log-probs
    token_logps: Tensor  # (2B, T), 0 at padding
    log_sum_sq_probs: Tensor | None = None  # (2B, T) log sum_v p_v^2, no grad, 0 at padding
    terms: dict[str, Tensor] = field(default_factory=dict)  # name -> (2B, T), 0 at padding
    hidden: Tensor | None = None  # (2B, T, H) last hidden state at response positions
    response_embeddings: Tensor | None = None  # (2B, H) mean over response tokens
    prompt_embeddings: Tensor | None = None  # (B, H) mean over prompt tokens


def _mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    mask = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)


def _aligned(mask: Tensor, flat: Tensor) -> Tensor:
    """(2B, T) with the flat per-token values (row-major over `mask`) and 0 at padding."""
    return torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device).masked_scatter(
        mask, flat)


def sequence_forward(model, batch, *, hidden: bool = False, embeddings: bool = False,
                     log_sum_sq: bool = False, terms: dict[str, TokenTerm] | None = None,
                     reference=None, chunk: int = DEFAULT_CHUNK) -> ForwardOutput:
    """Run `model` on a PairBatch. Log-probs are computed in float32 whatever the model's
    dtype (bf16 log-softmax loses the small differences DPO's margin is made of), in chunks
    (`token_outputs`). `log_sum_sq`: also log sum_v p_v^2 at each response position (WPO's
    weights), without gradient. `terms`: per-position TokenTerms, with `reference` the
    reference's distributions they read: the aligned (2B, T, k) TopKLogits, or the reference
    model (its full logits, made chunk by chunk)."""
    T, P = batch.labels.shape[1], batch.prompt_length
    device = batch.input_ids.device
    prompt = batch.prompt_mask.sum(-1).long()  # (2B,) each row's prompt length
    width = int(batch.attention_mask.sum(-1).max())
    cols = torch.arange(width, device=device)
    # row r's tokens sit at columns P - prompt[r] .. of the aligned layout: shift them to 0
    shifted = batch.input_ids.gather(
        1, ((P - prompt)[:, None] + cols[None, :]).clamp_max(batch.input_ids.shape[1] - 1))
    mask = batch.response_mask.bool()
    rows, t = mask.nonzero(as_tuple=True)  # row-major: the order _aligned fills
    at = prompt[rows] - 1 + t  # the column whose output predicts response token t of row r
    targets = batch.labels[rows, t]
    if isinstance(reference, TopKLogits):
        reference = reference.select(mask)
    elif reference is not None and terms:  # the reference model: its hidden states, no grad
        with torch.no_grad():
            ref = token_outputs(reference, shifted, rows, at, targets, hidden_only=True,
                                use_cache=False)
        head = output_head(reference)
        # a LoRA reference is the policy with adapters off: the head's base layer
        reference = LiveReference(ref.hidden, getattr(head, "base_layer", head))
    need_hidden = hidden or embeddings
    out = token_outputs(model, shifted, rows, at, targets, chunk=chunk, terms=terms,
                        reference=reference, log_sum_sq=log_sum_sq,
                        output_hidden_states=need_hidden, use_cache=False)
    token_logps = _aligned(mask, out.logps)
    result = ForwardOutput(logps=token_logps.sum(-1), token_logps=token_logps,
                           terms={k: _aligned(mask, v) for k, v in out.terms.items()})
    if log_sum_sq:
        result.log_sum_sq_probs = _aligned(mask, out.log_sum_sq)
    if need_hidden:
        last = out.model_output.hidden_states[-1]  # (2B, width, H)
        t_all = torch.arange(T, device=device)
        if hidden:  # the states that predict the response tokens
            result.hidden = _at(last, ((prompt - 1)[:, None] + t_all[None, :]).clamp_max(
                width - 1))
        if embeddings:
            at_response = _at(last, (prompt[:, None] + t_all[None, :]).clamp_max(width - 1))
            result.response_embeddings = _mean_pool(at_response.float(), batch.response_mask)
            B = batch.labels.shape[0] // 2
            is_prompt = (cols[None, :] < prompt[:B, None]).float()
            result.prompt_embeddings = _mean_pool(last[:B].float(), is_prompt)
    return result


def _at(values: Tensor, columns: Tensor) -> Tensor:
    """values[r, columns[r, t]] for (R, W, D) values and (R, T) columns: (R, T, D)."""
    return values.gather(1, columns[..., None].expand(-1, -1, values.shape[-1]))


def outputs_for(requires: frozenset[str]) -> dict[str, bool]:
    """Which expensive outputs a loss's `requires` asks for (from the policy's forward);
    `terms`: it reads the policy's per-position distributions (its token terms)."""
    return {
        "terms": bool(requires & {"policy_chosen_logits", "policy_rejected_logits"}),
        "embeddings": bool(requires & EMBEDDING_FIELDS),
        "token_logps": bool(requires & TOKEN_LOGP_FIELDS),
        "log_sum_sq": bool(requires & LOG_SUM_SQ_FIELDS),
        "ref_logits": bool(requires & (LOGIT_FIELDS - {"policy_chosen_logits",
                                                        "policy_rejected_logits"})),
        "ref_hidden": bool(requires & HIDDEN_FIELDS),
    }
