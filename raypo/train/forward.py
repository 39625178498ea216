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
  `_LinearLogProbs`, which takes the vocabulary in blocks as well and writes the logits'
  gradient in place, one buffer of chunk x block in all;
- a plain linear head and token terms: `_LinearInChunks`, autograd on each recomputed chunk
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
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from raypo.losses.batch import (
    EMBEDDING_FIELDS,
    LOG_SUM_SQ_FIELDS,
    LOGIT_FIELDS,
    TokenTerm,
    TopKLogits,
)

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
    terms = terms or {}
    head = output_head(model)
    width = input_ids.shape[1]
    extras: dict = {}

    def chunk_values(logits: Tensor, part: slice, first_run: bool) -> Tensor:
        """(chunk, 1 + len(terms)): the targets' log-probs and the terms, from float32
        logits; the extras only on a chunk's first run (not when the backward recomputes)."""
        log_normalizer = torch.logsumexp(logits, -1)
        labels = targets[part]
        values = [logits.gather(-1, labels[:, None])[:, 0] - log_normalizer]
        if terms:
            ref = None if reference is None else reference.take(part)
            ones = torch.ones_like(labels, dtype=logits.dtype)
            values += [term(logits, ref, labels, ones).to(logits.dtype)
                       for term in terms.values()]
        if first_run:
            with torch.no_grad():
                if log_sum_sq:  # log sum_v p_v^2 = logsumexp(2 z) - 2 logsumexp(z)
                    extras.setdefault("log_sum_sq", []).append(
                        torch.logsumexp(2 * logits, -1) - 2 * log_normalizer)
                if topk is not None:
                    extras.setdefault("topk", []).append(TopKLogits.from_logits(logits, topk))
        return torch.stack(values, -1)

    def checkpointed(h: Tensor) -> Tensor:
        """Any head (a LoRA-wrapped one too): each chunk a non-reentrant checkpoint."""
        runs: set[int] = set()

        def run(h_part, start):
            first = start not in runs
            runs.add(start)
            return chunk_values(project(h_part).float(), slice(start, start + chunk), first)

        return torch.cat([checkpoint(run, h[start:start + chunk], start, use_reentrant=False)
                          for start in range(0, h.shape[0], chunk)])

    def chunked(hidden: Tensor) -> Tensor:
        # a model may pass only its last columns (logits_to_keep) or all of them
        h = hidden[rows, cols - (width - hidden.shape[1])]  # (N, H)
        if hidden_only:
            return h
        if not h.shape[0]:
            return h.new_zeros(0, 1 + len(terms))
        if type(head) is nn.Linear and not terms and topk is None:
            return _LinearLogProbs.apply(h, head.weight, head.bias, targets, chunk,
                                         log_sum_sq, extras)[:, None]
        if not torch.is_grad_enabled():
            return torch.cat([chunk_values(project(h[start:start + chunk]).float(),
                                           slice(start, start + chunk), True)
                              for start in range(0, h.shape[0], chunk)])
        if type(head) is nn.Linear:
            return _LinearInChunks.apply(h, head.weight, head.bias, chunk, chunk_values)
        return checkpointed(h)

    project = head.forward  # the head's own forward, bound before it is replaced
    result = {}

    def replaced(hidden):
        result["out"] = chunked(hidden)
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
    outputs = TokenOutputs(logps=packed[:, 0], model_output=out,
                           terms={name: packed[:, 1 + k] for k, name in enumerate(terms)})
    if "log_sum_sq" in extras:
        outputs.log_sum_sq = torch.cat(extras["log_sum_sq"])
    if "topk" in extras:
        outputs.topk = TopKLogits.cat(extras["topk"])
    return outputs


# On the CPU the vocabulary is taken in blocks of about this many logits per chunk (16 MB of
# float32, which stays in cache across the in-place passes over it); on a GPU, where cache
# gains little and every block is more kernel launches, in one block
CPU_BLOCK_ELEMENTS = 1 << 22


def vocab_block(chunk: int, vocab: int, device_type: str) -> int:
    """The vocabulary block of `_LinearLogProbs` for chunks of `chunk` tokens."""
    if device_type != "cpu":
        return vocab
    return min(vocab, max(1024, CPU_BLOCK_ELEMENTS // max(chunk, 1)))


class _BlockLogits:
    """h W_b^T + b_b in float32 for one vocabulary block W_b = W[v:v + block] at a time; on
    the CPU float32 weights' go into one buffer reused from block to block (a fresh tensor
    per block would be fresh pages, each faulted and zeroed by the kernel). A GPU's caching
    allocator reuses memory itself, and there a plain F.linear keeps float16 autocast's
    casts (an out= product is not autocast)."""

    def __init__(self, weight: Tensor, bias: Tensor | None, rows: int, block: int):
        self.weight, self.bias, self.block = weight, bias, block
        self.buffer = (weight.new_empty(rows, block)
                       if weight.dtype == torch.float32 and weight.device.type == "cpu"
                       else None)

    def __call__(self, h: Tensor, v: int) -> Tensor:
        w = self.weight[v:v + self.block]
        bias = None if self.bias is None else self.bias[v:v + self.block]
        if self.buffer is None or h.dtype != torch.float32:
            return F.linear(h, w, bias).float()
        z = self.buffer[:h.shape[0], :w.shape[0]]
        torch.matmul(h, w.t(), out=z)
        return z if bias is None else z.add_(bias)


def _in_block(targets: Tensor, start: int, width: int) -> tuple[Tensor, Tensor]:
    """Which targets fall in the vocabulary block [start, start + width), and each target's
    column in the block (clamped into it where it falls outside: read only where inside)."""
    inside = (targets >= start) & (targets < start + width)
    return inside, (targets - start).clamp(0, width - 1)[:, None]


class _LinearLogProbs(torch.autograd.Function):
    """log softmax(h W^T + b)[target] for a plain linear head and a loss that reads only the
    targets' log-probs (no token terms), `chunk` rows by one vocabulary block (`vocab_block`)
    at a time. The log normaliser is accumulated over the blocks (a running maximum and sum,
    as flash attention does); the gradient of a block's logits, g (onehot(target) - softmax),
    is made in place in the block's one buffer, where autograd through logsumexp and gather
    makes four or five chunk x vocabulary tensors. The backward recomputes each block's
    logits. A frozen head (LoRA elsewhere) needs no recompute: the forward keeps
    E_p[W] = softmax @ W (N x H), and the gradient of h is g (W[target] - E_p[W]).
    `log_sum_sq`: WPO's log sum p^2, appended to out["log_sum_sq"] per chunk, no gradient."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk, log_sum_sq, out):
        n, vocab = h.shape[0], weight.shape[0]
        block = vocab_block(chunk, vocab, h.device.type)
        logits = _BlockLogits(weight, bias, min(chunk, n), block)
        logps = h.new_empty(n, dtype=torch.float32)
        log_normalizer = torch.empty_like(logps)
        frozen = (h.requires_grad and not weight.requires_grad
                  and (bias is None or not bias.requires_grad))
        expected = h.new_empty(n, h.shape[1], dtype=torch.float32) if frozen else None
        for i in range(0, n, chunk):
            h_part, t = h[i:i + chunk], targets[i:i + chunk]
            top = h_part.new_full((len(t),), -torch.inf, dtype=torch.float32)
            total, squares, target_logit = (torch.zeros_like(top) for _ in range(3))
            acc = torch.zeros_like(expected[i:i + chunk]) if frozen else None
            for v in range(0, vocab, block):
                z = logits(h_part, v)
                inside, at = _in_block(t, v, z.shape[1])
                target_logit = torch.where(inside, z.gather(1, at)[:, 0], target_logit)
                new_top = torch.maximum(top, z.amax(1))
                rescale = (top - new_top).exp()  # 0 on the first block (top = -inf)
                top = new_top
                unnormalized = z.sub_(top[:, None]).exp_()  # in (0, 1]: no overflow
                total = total * rescale + unnormalized.sum(1)
                if log_sum_sq:
                    squares = (squares * rescale.square()
                               + torch.linalg.vector_norm(unnormalized, dim=1).square())
                if frozen:
                    acc = acc * rescale[:, None] + (
                        unnormalized.to(weight.dtype) @ weight[v:v + block]).float()
                del z, unnormalized  # freed before the next block's logits are made
            log_normalizer[i:i + chunk] = top + total.log()
            logps[i:i + chunk] = target_logit - log_normalizer[i:i + chunk]
            if log_sum_sq:  # log sum p^2 = log sum exp(2 (z - max)) - 2 log sum exp(z - max)
                out.setdefault("log_sum_sq", []).append(squares.log() - 2 * total.log())
            if frozen:
                expected[i:i + chunk] = acc / total[:, None]
        ctx.save_for_backward(h, weight, bias, targets, log_normalizer, expected)
        ctx.chunk = chunk
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        h, weight, bias, targets, log_normalizer, expected = ctx.saved_tensors
        if expected is not None:  # frozen head: no logits to recompute
            grad_h = grad_logps[:, None] * (weight[targets].float() - expected)
            return grad_h.to(h.dtype), None, None, None, None, None, None
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n, vocab, chunk = h.shape[0], weight.shape[0], ctx.chunk
        block = vocab_block(chunk, vocab, h.device.type)
        logits = _BlockLogits(weight, bias, min(chunk, n), block)
        grad_h = torch.zeros_like(h) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if need_b else None
        for i in range(0, n, chunk):
            h_part, t = h[i:i + chunk], targets[i:i + chunk]
            g, lse = grad_logps[i:i + chunk, None], log_normalizer[i:i + chunk, None]
            for v in range(0, vocab, block):
                z = logits(h_part, v)
                grad_z = z.sub_(lse).exp_().mul_(-g)  # -g softmax
                inside, at = _in_block(t, v, z.shape[1])
                grad_z.scatter_add_(1, at, g * inside[:, None])  # + g onehot(target)
                grad_z = grad_z.to(weight.dtype)
                if need_h:
                    grad_h[i:i + chunk].addmm_(grad_z, weight[v:v + block])
                if need_w:
                    grad_w[v:v + block].addmm_(grad_z.t(), h_part)
                if need_b:
                    grad_b[v:v + block] += grad_z.sum(0)
                del z, grad_z  # freed before the next block's logits are made
        return grad_h, grad_w, grad_b, None, None, None, None


class _LinearInChunks(torch.autograd.Function):
    """values(h W^T + b) a chunk of rows at a time, for a plain linear head: the forward keeps
    no logits; the backward recomputes each chunk's, takes the gradient of `values` with
    respect to them (autograd, whatever the terms are), and adds the chunk's share of the
    weight's gradient into one buffer (addmm_). Checkpointing each chunk instead would hand
    autograd one vocabulary x hidden weight gradient per chunk to sum: twice the head's
    gradient memory at the backward's peak. The terms may hold no trainable parameters of
    their own (none does: their gradient would not be taken here)."""

    @staticmethod
    def forward(ctx, h, weight, bias, chunk, values):
        ctx.save_for_backward(h, weight, bias)
        ctx.chunk, ctx.values = chunk, values
        with torch.no_grad():
            return torch.cat([values(F.linear(h[i:i + chunk], weight, bias).float(),
                                     slice(i, i + chunk), True)
                              for i in range(0, h.shape[0], chunk)])

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, bias = ctx.saved_tensors
        chunk = ctx.chunk
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        grad_b = torch.zeros_like(bias) if bias is not None and ctx.needs_input_grad[2] else None
        for i in range(0, h.shape[0], chunk):
            h_part = h[i:i + chunk]
            with torch.enable_grad():
                z = F.linear(h_part, weight, bias).detach().requires_grad_()
                out = ctx.values(z.float(), slice(i, i + chunk), False)
                (grad_z,) = torch.autograd.grad(out, z, grad_out[i:i + chunk])
            if grad_h is not None:
                grad_h[i:i + chunk] = grad_z @ weight
            if grad_w is not None:
                grad_w.addmm_(grad_z.t(), h_part)
            if grad_b is not None:
                grad_b += grad_z.sum(0)
            del z, out, grad_z  # freed before the next chunk's logits are made
        return grad_h, grad_w, grad_b, None, None


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
