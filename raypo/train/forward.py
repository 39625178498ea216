"""One forward over chosen and rejected concatenated, producing only what the loss reads.

The batch layout (raypo.data.collate): rows 0..B-1 chosen, B..2B-1 rejected, every prompt
ending and every response starting at column P, so that per-token outputs come out aligned
with `labels` (B, T). The model itself does not run on that layout: its width is the longest
prompt plus the longest response, about 1.6 times the real tokens on data of varied lengths.
Each row is shifted left to start at column 0 (right padding only, width = the longest
sequence, about 1.2 times the real tokens), which a causal model computes exactly as each row
alone without an attention mask (no real token attends to a later position); the outputs at
response positions are then gathered back into the aligned layout. Logits are computed only
from the first column that predicts a response token on (`logits_to_keep`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from raypo.losses.batch import EMBEDDING_FIELDS, LOG_SUM_SQ_FIELDS, LOGIT_FIELDS

TOKEN_LOGP_FIELDS = frozenset({
    "policy_chosen_token_logps", "policy_rejected_token_logps",
    "ref_chosen_token_logps", "ref_rejected_token_logps",
})
HIDDEN_FIELDS = frozenset({"ref_chosen_hidden", "ref_rejected_hidden"})


@dataclass
class ForwardOutput:
    """Per-row (2B) results of one forward; fields a loss does not need stay None."""

    logps: Tensor  # (2B,) summed response log-probs
    token_logps: Tensor  # (2B, T), 0 at padding
    log_sum_sq_probs: Tensor | None = None  # (2B, T) log sum_v p_v^2, no grad, 0 at padding
    logits: Tensor | None = None  # (2B, T, V) at response positions
    hidden: Tensor | None = None  # (2B, T, H) last hidden state at response positions
    response_embeddings: Tensor | None = None  # (2B, H) mean over response tokens
    prompt_embeddings: Tensor | None = None  # (B, H) mean over prompt tokens


def _mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    mask = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)


def sequence_forward(model, batch, *, logits: bool = False, hidden: bool = False,
                     embeddings: bool = False, log_sum_sq: bool = False) -> ForwardOutput:
    """Run `model` on a PairBatch. Log-probs are computed in float32 whatever the model's
    dtype (bf16 log-softmax loses the small differences DPO's margin is made of).
    `log_sum_sq`: also log sum_v p_v^2 at each response position (WPO's weights), without
    gradient."""
    T, P = batch.labels.shape[1], batch.prompt_length
    device = batch.input_ids.device
    prompt = batch.prompt_mask.sum(-1).long()  # (2B,) each row's prompt length
    width = int(batch.attention_mask.sum(-1).max())
    first = int(prompt.min())  # the first column whose next token is a response token
    cols = torch.arange(width, device=device)
    # row r's tokens sit at columns P - prompt[r] .. of the aligned layout: shift them to 0
    shifted = batch.input_ids.gather(
        1, ((P - prompt)[:, None] + cols[None, :]).clamp_max(batch.input_ids.shape[1] - 1))
    need_hidden = hidden or embeddings
    out = model(input_ids=shifted, logits_to_keep=width - first + 1,
                output_hidden_states=need_hidden, use_cache=False)
    t = torch.arange(T, device=device)
    # column first-1+c of the shifted rows predicts token first+c: response token t of row r
    # (at column prompt[r] + t) is predicted by kept column prompt[r] - first + t
    at = ((prompt - first)[:, None] + t[None, :]).clamp_max(out.logits.shape[1] - 1)
    step_logits = _at(out.logits, at).float()  # padding columns clamped: masked out below
    # logit(label) - logsumexp: no second (2B, T, V) tensor as log_softmax would make
    log_normalizer = torch.logsumexp(step_logits, -1)
    token_logps = (step_logits.gather(-1, batch.labels.unsqueeze(-1)).squeeze(-1)
                   - log_normalizer) * batch.response_mask
    result = ForwardOutput(logps=token_logps.sum(-1), token_logps=token_logps,
                           logits=step_logits if logits else None)
    if log_sum_sq:  # log sum_v p_v^2 = logsumexp(2 z) - 2 logsumexp(z)
        with torch.no_grad():
            result.log_sum_sq_probs = ((torch.logsumexp(2 * step_logits, -1)
                                        - 2 * log_normalizer) * batch.response_mask)
    if need_hidden:
        last = out.hidden_states[-1]  # (2B, width, H)
        if hidden:  # the states that predict the response tokens
            result.hidden = _at(last, ((prompt - 1)[:, None] + t[None, :]).clamp_max(width - 1))
        if embeddings:
            at_response = _at(last, (prompt[:, None] + t[None, :]).clamp_max(width - 1))
            result.response_embeddings = _mean_pool(at_response.float(), batch.response_mask)
            B = batch.labels.shape[0] // 2
            is_prompt = (cols[None, :] < prompt[:B, None]).float()
            result.prompt_embeddings = _mean_pool(last[:B].float(), is_prompt)
    return result


def _at(values: Tensor, columns: Tensor) -> Tensor:
    """values[r, columns[r, t]] for (R, W, D) values and (R, T) columns: (R, T, D)."""
    return values.gather(1, columns[..., None].expand(-1, -1, values.shape[-1]))


def outputs_for(requires: frozenset[str]) -> dict[str, bool]:
    """Which expensive outputs a loss's `requires` asks for (from the policy's forward)."""
    return {
        "logits": bool(requires & {"policy_chosen_logits", "policy_rejected_logits"}),
        "embeddings": bool(requires & EMBEDDING_FIELDS),
        "token_logps": bool(requires & TOKEN_LOGP_FIELDS),
        "log_sum_sq": bool(requires & LOG_SUM_SQ_FIELDS),
        "ref_logits": bool(requires & (LOGIT_FIELDS - {"policy_chosen_logits",
                                                        "policy_rejected_logits"})),
        "ref_hidden": bool(requires & HIDDEN_FIELDS),
    }
